"""`python -m distnn ...` is `distnn ...` (see cli.py); `mpiexec -n 2 python -m distnn train CFG` too."""
import sys

from .cli import main

sys.exit(main())
