"""``python -m manifold_ext.cli`` (what ``torchrun ... -m manifold_ext.cli`` runs)."""

import sys

from . import main

sys.exit(main())
