"""``python -m services.loadtest``: the load tester without the ``step37-serve`` entry point."""

import sys

from services.loadtest.cli import main

sys.exit(main())
