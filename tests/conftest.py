"""Suite-wide settings.

The suite runs as root (it installs and starts real servers), and starts
`authgate run` in many places with configs that name no `user`: it tells
authgate, through the environment its subprocesses inherit, that staying
root is intended there (authgate.privileges). tests/ops/test_privileges.py
takes the variable away to check the refusal and the drop.
"""

from __future__ import annotations

import os

from authgate.privileges import ROOT_ENV

os.environ[ROOT_ENV] = "1"
