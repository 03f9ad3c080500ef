"""`python -m minigpt.inspect`: see `minigpt.cli.inspect` (the library is `minigpt.inspection`)."""

import sys

from .cli.inspect import main

if __name__ == "__main__":
    sys.exit(main())
