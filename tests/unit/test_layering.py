"""Import layering, as declared in pyproject.toml's [tool.importlinter] contracts:

- the operator never imports the training stack (torch, transformers, peft, boto3, ...),
  the CLI's local training commands aside;
- the pure operator modules (api, reconcile, translate, workload, sweep, manifests)
  import neither kopf nor the Kubernetes client;
- the operator imports only the trainer's config and errors modules, and those import no
  other trainer module (so nothing reaches the operator through them).

import-linter (grimp) reads every import statement, function-level ones included, and
follows indirect chains, so a violation anywhere breaks the contract and this test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), "import-linter is missing: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(lint_imports), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout, result.stdout
