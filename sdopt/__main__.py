"""``python -m sdopt`` runs the command line interface."""

from sdopt.cli import main

raise SystemExit(main())
