"""``python -m harness.calibrate``."""

import sys

from harness.calibrate.run import main

sys.exit(main())
