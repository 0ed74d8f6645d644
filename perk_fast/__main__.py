"""``python -m perk_fast ...`` is the ``perk-fast`` command line (:mod:`perk_fast.cli`)."""
import sys

from .cli import main

sys.exit(main())
