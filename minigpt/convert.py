"""`python -m minigpt.convert`: see `minigpt.cli.convert`."""

import sys

from .cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
