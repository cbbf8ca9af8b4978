"""`python -m humpback_runtime …` is the `humpback` command (what stage pods run)."""

import sys

from humpback_runtime.cli import main

sys.exit(main())
