"""``python -m petl_zoo COMMAND ...``: the same as the ``petl-zoo`` console command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
