"""``python -m strands_py``: see ``strands_py._demo.cli``."""

import sys

from ._demo.cli import main

sys.exit(main())
