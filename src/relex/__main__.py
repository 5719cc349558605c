"""`python -m relex ...` and `torchrun --nproc-per-node N -m relex extrapolate ...`."""

import sys

from relex.stream import torchrun
from relex.cli import main

if __name__ == "__main__":
    code = None
    try:
        code = main()
    finally:
        torchrun.reset(ok=code == 0)
    sys.exit(code)
