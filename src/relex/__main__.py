"""`python -m relex ...` and `torchrun --nproc-per-node N -m relex extrapolate ...`."""

import sys

from relex import distributed
from relex.cli import main

if __name__ == "__main__":
    code = None
    try:
        code = main()
    finally:
        distributed.reset(ok=code == 0)
    sys.exit(code)
