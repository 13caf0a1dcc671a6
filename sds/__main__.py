"""``python -m sds`` is the ``sds`` command."""

import sys

from .cli import main

sys.exit(main())
