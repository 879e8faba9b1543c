"""``grpo_curves.png``: the rewards, completion length, and entropy / KL / clip ratio of a GRPO run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CURVES_FILE = "grpo_curves.png"


def plot_grpo(history: list[dict[str, Any]], path: Path) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[Any], list[Any]]:
        rows = [r for r in history if r.get(key) is not None]
        return [r["step"] for r in rows], [r[key] for r in rows]

    fig = Figure(figsize=(15, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_reward, ax_length, ax_policy = fig.subplots(1, 3)
    steps, mean = series("reward")
    _, std = series("reward_std")
    if mean:
        ax_reward.plot(steps, mean, "-", lw=2, color="black", label="reward (weighted sum)")
        if len(std) == len(mean):
            ax_reward.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                                   [m + s for m, s in zip(mean, std, strict=True)], color="black", alpha=0.1)
    names = sorted({k[len("reward/"):-len("/mean")] for r in history for k in r
                    if k.startswith("reward/") and k.endswith("/mean")})
    for name in names:
        ax_reward.plot(*series(f"reward/{name}/mean"), "--", label=name)
    ax_length.plot(*series("completion_length"), color="tab:green")
    for key in ("entropy", "kl", "clip_ratio"):
        if any(key in r for r in history):
            ax_policy.plot(*series(key), label=key)
    for ax, title in ((ax_reward, "reward (mean; band: std)"), (ax_length, "completion length (tokens)"),
                      (ax_policy, "entropy, KL, clip ratio")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return str(path)

