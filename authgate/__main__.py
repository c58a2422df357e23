"""`python -m authgate` is the `authgate` command."""

import sys

from authgate.cli import main

sys.exit(main())
