"""`python -m minigpt.serve`: see `minigpt.cli.serve` (the library is `minigpt.serving`)."""

import sys

from .cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
