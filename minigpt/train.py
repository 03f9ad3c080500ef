"""`python -m minigpt.train`: see `minigpt.cli.train`."""

import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
