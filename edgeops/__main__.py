"""``python -m edgeops``: the ``edgeops`` command line."""

from edgeops.cli.main import main

raise SystemExit(main())
