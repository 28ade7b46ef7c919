"""A stand-in trainer image for tests that exercise the operator, not the training:
reports a result (or sleeps, to be deleted while running) and exits like the trainer.
``until PATH``: runs until PATH exists (the test decides when it finishes), then succeeds.
``fail-once``: the first attempt (its pod's hostname has ``-attempt-1-``) fails as the
trainer does when object storage is unreachable (exit 20, retryable); later ones succeed.
"""

from __future__ import annotations

import json
import os
import sys
import time

if __name__ == "__main__":
    if sys.argv[1:] == ["sleep"]:
        time.sleep(120)
    if sys.argv[1:2] == ["until"]:  # runs until the file named next exists, then succeeds
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.05)
    if sys.argv[1:] == ["fail-once"] and "-attempt-1-" in os.environ.get("HOSTNAME", ""):
        error = {
            "reason": "StorageUnavailable",
            "message": "object storage did not answer (fake)",
            "retryable": True,
            "exitCode": 20,
        }
        with open(os.environ["KUBETUNE_TERMINATION_MESSAGE_PATH"], "w") as handle:
            json.dump({"error": error}, handle)
        sys.exit(20)
    result = {
        "artifact": {"uri": "s3://bucket/fake/adapter", "digest": "sha256:00", "sizeBytes": 1},
        "metrics": {"train_loss": 1.0},
    }
    with open(os.environ["KUBETUNE_TERMINATION_MESSAGE_PATH"], "w") as handle:
        json.dump(result, handle)
