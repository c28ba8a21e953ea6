"""python -m imm (what torchrun -m imm runs)."""

import sys

from .cli import main

sys.exit(main())
