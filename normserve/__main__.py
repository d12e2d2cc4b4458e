"""``python -m normserve``: the same as the ``normserve`` command."""

import sys

from normserve.cli import main

sys.exit(main())
