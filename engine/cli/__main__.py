"""``python -m engine.cli ...`` is ``dv3 ...`` (what torchrun, srun and mpirun start)."""

import sys

from engine.cli import main

sys.exit(main())
