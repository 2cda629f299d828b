"""``python -m cli ...``: the ``bimac`` command without the console script."""

import sys

from cli import main

sys.exit(main())
