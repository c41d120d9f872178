"""``python -m fastadapt``: the ``fastadapt`` command."""

import sys

from fastadapt.cli import main

sys.exit(main())
