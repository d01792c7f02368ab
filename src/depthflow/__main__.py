"""`python -m depthflow` is the `depthflow` command."""

from depthflow.cli import main

raise SystemExit(main())
