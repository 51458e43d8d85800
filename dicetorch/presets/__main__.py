"""``python -m dicetorch.presets`` (see :mod:`dicetorch.presets._cli`)."""
import sys

from ._cli import _main

sys.exit(_main())
