"""The loss curve written next to the artifact (loss.png), and the smoothing it uses.

Per-step train loss on small batches swings by more than a whole run's improvement, so
the plot draws an exponential moving average (bias-corrected, as TensorBoard's smoothing
slider does) over the raw loss drawn faintly, with eval loss on the same axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Weight of the history in the moving average: each point is 0.9 × the average so far
# plus 0.1 × the new loss, so the curve follows about the last 10–20 steps.
SMOOTHING = 0.9


def ema(values: Sequence[float], smoothing: float = SMOOTHING) -> list[float]:
    """The bias-corrected exponential moving average of ``values``.

    ``avg_i = smoothing * avg_{i-1} + (1 - smoothing) * x_i`` from ``avg_{-1} = 0``,
    divided by ``1 - smoothing**(i + 1)`` so that the first points are not pulled
    towards zero: the first smoothed value is the first value, and a constant series
    stays constant. ``smoothing`` 0 returns the values unchanged.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), not {smoothing}")
    smoothed: list[float] = []
    average = 0.0
    for i, value in enumerate(values):
        average = smoothing * average + (1.0 - smoothing) * value
        smoothed.append(average / (1.0 - smoothing ** (i + 1)))
    return smoothed


def write_loss_plot(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Plot the Trainer's ``log_history`` (train ``loss`` and ``eval_loss`` entries) to
    ``path``: raw train loss faint, its moving average solid, eval loss with markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], float(e["loss"])) for e in history if "loss" in e]
    evals = [(e["step"], float(e["eval_loss"])) for e in history if "eval_loss" in e]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train, strict=True)
        axes.plot(
            steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train (per step)"
        )
        axes.plot(
            steps,
            ema(losses),
            color="tab:blue",
            linewidth=2,
            label=f"train (moving average, smoothing {SMOOTHING})",
        )
    if evals:
        axes.plot(*zip(*evals, strict=True), color="tab:orange", marker="o", label="eval")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean cross-entropy per trained token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if train or evals:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
