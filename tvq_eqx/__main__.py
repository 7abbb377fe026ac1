"""`python -m tvq_eqx train | eval | sample | bench` (see tvq_eqx.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
