"""``python -m manifold_ext``: the ``manifold-ext`` command line."""

import sys

from .cli import main

sys.exit(main())
