"""``python -m ddpm_fast`` runs the ``ddpm-fast`` command line."""

import sys

from .cli import main

sys.exit(main())
