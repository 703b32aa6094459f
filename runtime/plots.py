"""Learning-curve and settling plots (matplotlib, Agg backend), written atomically as PNG."""
from __future__ import annotations

import io

from epc.compiler.bundle import atomic_write_bytes


def plot_run(history: list[dict], sweep_trace: list[dict] | None, path: str,
             title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ep = [h["epoch"] for h in history]
    ax = axes[0]
    ax.plot(ep, [h["train_loss"] for h in history], label="train")
    ax.plot(ep, [h["test_loss"] for h in history], label="test")
    ax.set_xlabel("epoch"); ax.set_ylabel("loss at the free fixed point"); ax.legend()
    ax = axes[1]
    ax.plot(ep, [100 * h["train_accuracy"] for h in history], label="train")
    ax.plot(ep, [100 * h["test_accuracy"] for h in history], label="test")
    ax.set_xlabel("epoch"); ax.set_ylabel("accuracy (%)"); ax.legend()
    ax = axes[2]
    if sweep_trace:
        sw = list(range(1, len(sweep_trace) + 1))
        ax.semilogy(sw, [max(t["residual"], 1e-12) for t in sweep_trace], "C0", label="residual")
        ax.set_xlabel("sweep (first free phase)"); ax.set_ylabel("max |delta s|", color="C0")
        ax2 = ax.twinx()
        ax2.plot(sw, [t["energy"] for t in sweep_trace], "C1", label="energy")
        ax2.set_ylabel("mean energy", color="C1")
    ax.set_title("settling")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
