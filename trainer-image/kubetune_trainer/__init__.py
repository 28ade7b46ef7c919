"""kubetune's data plane: the PEFT fine-tuning loop that runs inside the trainer pod.

Importing this package (and ``kubetune_trainer.config``) never imports torch; the
heavy modules are imported only by the stages that need them.
"""

__version__ = "0.1.0"
