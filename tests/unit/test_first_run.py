"""A clean first run: library noise filtered, a smoothed loss plot, a summary of gains."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from kubetune_trainer.lossplot import ema, write_loss_plot
from kubetune_trainer.main import _print_summary
from kubetune_trainer.quiet import silence_library_noise

pytestmark = pytest.mark.unit


def _warn_from(module: str, message: str, category: type[Warning]) -> None:
    warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)


def test_known_warnings_are_dropped_and_others_kept() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_library_noise()
        _warn_from(
            "transformers.modeling_utils",
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
        )
        warnings.warn("the data has 3 empty responses", UserWarning, stacklevel=1)
        _warn_from("transformers.modeling_utils", "something else is deprecated", FutureWarning)
        _warn_from("ourcode", "`is_gradient_checkpointing` is deprecated (our own)", FutureWarning)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "the data has 3 empty responses",
        "something else is deprecated",
        "`is_gradient_checkpointing` is deprecated (our own)",
    ]


def test_known_log_lines_are_dropped_and_others_kept(caplog: pytest.LogCaptureFixture) -> None:
    silence_library_noise()
    silence_library_noise()  # idempotent: one filter per logger
    mtime = logging.getLogger("transformers.trainer_utils")
    assert len(mtime.filters) == 1
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        mtime.warning("mtime may not be reliable on this filesystem, falling back to numerical")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "x")
        mtime.warning("a real problem with checkpoint-10")
        bnb.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == [
        "a real problem with checkpoint-10",
        "something else went wrong",
    ]


def test_library_progress_bars_are_off() -> None:
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    silence_library_noise()
    assert not transformers_logging.is_progress_bar_enabled()


def test_ema_on_a_known_series() -> None:
    assert ema([]) == []
    assert ema([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # bias-corrected
    assert ema([1.0, 2.0, 3.0], smoothing=0.0) == [1.0, 2.0, 3.0]
    # 0.5: averages 0.5, 0.5*0.5 + 0.5*3 = 1.75; divided by 1 - 0.5 and 1 - 0.25.
    assert ema([1.0, 3.0], smoothing=0.5) == pytest.approx([1.0, 1.75 / 0.75])
    smoothed = ema([6.0, 2.0] * 50)
    assert max(smoothed[20:]) - min(smoothed[20:]) < 1.0  # swings of 4 become < 1
    with pytest.raises(ValueError, match="smoothing"):
        ema([1.0], smoothing=1.0)


def test_loss_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    history = [{"step": 0, "eval_loss": 7.0}]
    history += [{"step": s, "loss": 7.0 - s / 20 + (s % 2)} for s in range(1, 61)]
    history += [{"step": s, "eval_loss": 7.0 - s / 20} for s in (20, 40, 60)]
    path = tmp_path / "loss.png"
    write_loss_plot(history, path, "job: lora")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_loss_plot([], tmp_path / "empty.png", "nothing logged")
    assert (tmp_path / "empty.png").is_file()


def test_summary_says_what_improved(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = {
        "steps": 480.0,
        "first_train_loss": 7.35,
        "train_loss": 0.9,
        "train_loss_smoothed": 0.83,
        "initial_eval_loss": 7.14,
        "eval_loss": 1.26,
        "perplexity": 3.52,
    }
    artifact = SimpleNamespace(uri="file:///out/adapter", digest="sha256:0")
    _print_summary(
        SimpleNamespace(
            metrics=metrics,
            stats={},
            resumed_from_step=None,
            artifact=artifact,
            reused=False,
            kind="adapter",
        ),
        30.0,
    )
    out = capsys.readouterr().out
    assert "train loss   7.3500 → 0.8300 (-89%) (first step → moving average)" in out
    assert "eval loss    7.1400 → 1.2600 (-82%) (before training → after" in out

    del metrics["initial_eval_loss"], metrics["train_loss_smoothed"]
    _print_summary(
        SimpleNamespace(
            metrics=metrics,
            stats={},
            resumed_from_step=None,
            artifact=artifact,
            reused=False,
            kind="adapter",
        ),
        30.0,
    )
    out = capsys.readouterr().out
    assert "train loss   7.3500 → 0.9000 (-88%) (first step → last)" in out
    assert "eval loss    1.2600 (perplexity 3.52)" in out
    assert "  adapter      file:///out/adapter" in out


@pytest.mark.parametrize(
    "example",
    [
        "examples/tiny-local.yaml",
        "examples/tiny-evaluation.yaml",
        "examples/tiny-prompt-tuning.yaml",
        "examples/sweeps/tiny-local.yaml",
    ],
)
def test_local_examples_point_where_the_readme_builds_the_tiny_model(example: str) -> None:
    """The README builds the tiny model and data under ``.kubetune/`` at the repository's
    root and then runs these examples; their relative paths start at the example's own
    directory, so they must reach back to the root (a path written against the current
    directory made the README's main command fail)."""
    from kubetune_operator.manifests import resolve_local_paths

    root = Path(__file__).resolve().parents[2]
    path = root / example
    body = yaml.safe_load(path.read_text())
    spec = body["spec"]["template"] if body["kind"] == "FineTuneSweep" else body["spec"]
    resolved, _ = resolve_local_paths(spec, path.parent)
    assert Path(os.path.normpath(resolved["model"]["source"])) == root / ".kubetune" / "tiny-model"
    for source in resolved["dataset"]["sources"]:
        assert Path(os.path.normpath(source)).parent == root / ".kubetune" / "tiny-data"
