"""``python -m mrsynth`` (also what ``torchrun -m mrsynth`` runs)."""

import sys

from mrsynth.cli import main

sys.exit(main())
