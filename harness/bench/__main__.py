"""``python -m harness.bench.run``."""

import sys

from harness.bench.run.run import main

sys.exit(main())
