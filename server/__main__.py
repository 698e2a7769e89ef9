"""`python -m server` is the `loraplex` command."""

import sys

from .cli import main

sys.exit(main())
