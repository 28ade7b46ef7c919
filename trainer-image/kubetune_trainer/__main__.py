"""``python -m kubetune_trainer``: the trainer pod's entry point."""

from .main import main

raise SystemExit(main())
