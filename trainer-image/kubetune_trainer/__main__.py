"""``python -m kubetune_trainer``: the trainer pod's entry point."""

from .main import exit_process, main

exit_process(main())
