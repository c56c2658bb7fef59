"""``python -m flatlens`` (and ``torchrun ... -m flatlens train``)."""

import sys

from flatlens.cli import main

sys.exit(main())
