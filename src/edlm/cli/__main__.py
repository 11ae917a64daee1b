"""``python -m edlm.cli``: the same as the ``edlm`` console script."""

import sys

from edlm.cli import main

sys.exit(main())
