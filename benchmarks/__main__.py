"""`python -m benchmarks` (from the repository root) is `fastdiff bench`."""

import sys

from .cli import main

sys.exit(main())
