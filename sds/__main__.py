"""``python -m sds`` is the ``sds`` command."""

import sys

from sds.cli import main

sys.exit(main())
