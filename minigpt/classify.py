"""`python -m minigpt.classify`: see `minigpt.cli.classify` (the library is `minigpt.classifier`)."""

import sys

from .cli.classify import main

if __name__ == "__main__":
    sys.exit(main())
