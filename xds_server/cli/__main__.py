"""``python -m xds_server.cli``: the ``inferlane`` command."""

import sys

from xds_server.cli import main

sys.exit(main())
