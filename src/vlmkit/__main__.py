"""`python -m vlmkit` (also what `torchrun -m vlmkit train ...` runs)."""

import sys

from vlmkit.cli import main

sys.exit(main())
