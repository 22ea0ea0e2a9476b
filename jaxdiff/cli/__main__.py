"""`python -m jaxdiff.cli`: the `jaxdiff` command."""

import sys

from jaxdiff.cli import main

if __name__ == "__main__":
    sys.exit(main())
