"""``python -m llmpipe.estimate``: the ``llmpipe-estimate`` command."""

import sys

from llmpipe.estimate.cli import main

sys.exit(main())
