"""``python -m harness.calibrate.run``."""

import sys

from harness.calibrate.run.run import main

sys.exit(main())
