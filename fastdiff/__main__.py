"""`python -m fastdiff`: the command line."""

import sys

from fastdiff.cli import main

sys.exit(main())
