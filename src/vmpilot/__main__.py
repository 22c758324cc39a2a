"""`python -m vmpilot` is the `vmpilot` command."""

import sys

from .cli import main

sys.exit(main())
