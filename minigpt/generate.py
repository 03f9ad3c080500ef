"""`python -m minigpt.generate`: see `minigpt.cli.generate` (the library is `minigpt.generation`)."""

import sys

from .cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
