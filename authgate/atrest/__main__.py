"""`python -m authgate.atrest`: the encrypt, decrypt, rekey and log commands on
their own (they are also sub-commands of `authgate`)."""

import sys

from authgate.commands.atrest import main

sys.exit(main())
