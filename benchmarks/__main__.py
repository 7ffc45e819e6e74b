"""`python -m benchmarks` (from the repository root) is `fastdiff bench`."""

import sys

from fastdiff.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
