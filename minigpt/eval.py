"""`python -m minigpt.eval`: see `minigpt.cli.eval`."""

import sys

from .cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
