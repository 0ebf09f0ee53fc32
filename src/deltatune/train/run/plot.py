"""The loss curve (`loss.png`): train and eval loss against step, the learning rate on a second axis,
titled with the run (its output folder and method).

matplotlib is a default dependency, so every run draws it; where it has been removed the run says so in
one line (finish.py) and writes the rest of its files."""

from __future__ import annotations

import os

from ...io.atomic import atomic_write


def loss_figure(records: list[dict], title: str | None = None):
    """The matplotlib Figure for metrics.jsonl `records`: losses on the left axis, the learning rate
    (when recorded) on a right-hand twin axis.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    rates = [(r["step"], r["lr"]) for r in records if "lr" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    lines = []
    if train:
        lines += ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        lines += ax.plot(*zip(*evals), "o-", label="eval loss")
    values = [v for _, v in train + evals]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")  # fine-tuning losses often fall by orders of magnitude
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per token)")
    ax.grid(alpha=0.3)
    if rates:
        lr_axis = ax.twinx()
        lines += lr_axis.plot(*zip(*rates), color="tab:gray", linestyle="--", linewidth=1,
                              label="learning rate")
        lr_axis.set_ylabel("learning rate")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if title:
        ax.set_title(title)
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    return fig


def plot_loss(records: list[dict], path: str | os.PathLike, title: str | None = None) -> bool:
    """Write loss_figure(records, title) to `path` as PNG; False (nothing written) without matplotlib."""
    try:
        fig = loss_figure(records, title)
    except ImportError:
        return False
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True
