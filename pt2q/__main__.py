"""`python -m pt2q` is the `pt2q` command."""
import sys

from .cli import main

sys.exit(main())
