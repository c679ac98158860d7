"""``python -m harness.bench``."""

import sys

from harness.bench.run import main

sys.exit(main())
