"""python -m imm (what torchrun -m imm runs)."""

import sys

from imm.cli import main

sys.exit(main())
