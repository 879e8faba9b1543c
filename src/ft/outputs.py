"""The output directory: what a finished run holds, and writing what a user reads after training.

After ``ft_save_weights`` wrote the weights, ``write_run_files`` adds the tokenizer, the
resolved config (``ft_config.yaml``), the plugin manifest (``ft_plugins.json``), the metrics
(``metrics.json``) and the loss / learning-rate curves (``training_curves.png``), then prints
the end-of-run summary. Only the main process writes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from ft import __version__

if TYPE_CHECKING:
    from ft.context import Context

log = logging.getLogger("ft.outputs")

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CONFIG_FILE = "ft_config.yaml"
PLUGINS_FILE = "ft_plugins.json"
METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "peft", "bitsandbytes")


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def finished_weights(output_dir: str | os.PathLike) -> list[str]:
    """Weight files of a finished run in ``output_dir`` (empty if none)."""
    out = Path(output_dir)
    return [name for name in WEIGHT_FILES if (out / name).is_file()]


def write_run_files(ctx: Context, trainer: Any, tokenizer: Any, metrics: dict[str, Any], patches: list[Any]) -> list[str]:
    """Tokenizer, resolved config, plugin manifest, metrics and curves; then the summary. Main process only."""
    from ft.train import history_of

    is_main = trainer.is_world_process_zero() if hasattr(trainer, "is_world_process_zero") else is_main_process()
    if not is_main:
        return []
    cfg = ctx.cfg
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = history_of(trainer)
    files = [str(p) for p in tokenizer.save_pretrained(str(out))]
    files.append(write_config(ctx, out / CONFIG_FILE))
    files.append(write_manifest(ctx, patches, out / PLUGINS_FILE))
    files.append(write_metrics(metrics, history, out / METRICS_FILE))
    files.append(plot_curves(history, out / CURVES_FILE))
    print_summary(metrics, out)
    return files


def write_config(ctx: Context, path: Path) -> str:
    from ft.record import saveable_config

    cfg = ctx.cfg
    data = saveable_config(cfg)
    header = f"# resolved config written by ft {__version__}" + (f" from {cfg.source}" if cfg.source else "") + "\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return str(path)


def write_manifest(ctx: Context, patches: list[Any], path: Path) -> str:
    manifest = {
        "ft_version": __version__,
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES if _version(name)},
        "selected": list(ctx.cfg.plugins),
        "plugins": ctx.pm.manifest(),
        "patches": [str(p) for p in patches],
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return str(path)


def write_metrics(metrics: dict[str, Any], history: list[dict[str, Any]], path: Path) -> str:
    path.write_text(json.dumps({"summary": metrics, "history": history}, indent=2, default=str) + "\n",
                    encoding="utf-8")
    return str(path)


def plot_curves(history: list[dict[str, Any]], path: Path) -> str:
    """Loss (train and eval) and learning rate against the optimizer step, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global backend, no GUI
    ax_loss, ax_lr = fig.subplots(1, 2)
    def series(key: str) -> tuple[list[Any], list[Any]]:
        rows = [r for r in history if r.get(key) is not None]
        return [r["step"] for r in rows], [r[key] for r in rows]

    steps, loss = series("loss")
    if loss:
        ax_loss.plot(steps, loss, label="train loss", marker="." if len(loss) < 30 else None)
    steps, eval_loss = series("eval_loss")
    if eval_loss:
        ax_loss.plot(steps, eval_loss, "o-", label="eval loss")
    steps, lr = series("learning_rate")
    if lr:
        ax_lr.plot(steps, lr, color="tab:green")
    for ax, title in ((ax_loss, "loss"), (ax_lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    if ax_loss.lines:
        ax_loss.legend()
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return str(path)


def print_summary(metrics: dict[str, Any], out: Path) -> None:
    def num(v: Any, fmt: str = ",") -> str:
        return "-" if v is None else format(v, fmt)

    loss = num(metrics.get("final_loss"), ".4f")
    if metrics.get("eval_loss") is not None:
        loss += f"  (eval {metrics['eval_loss']:.4f})"
    lines = [
        "training finished",
        f"  steps       {num(metrics.get('steps'))}  ({num(metrics.get('epochs'), '.2f')} epochs)",
        f"  tokens      {num(metrics.get('train_tokens'))}  ({num(metrics.get('trained_tokens'))} trained)",
        f"  tokens/s    {num(metrics.get('tokens_per_second'), ',.0f')}  in {num(metrics.get('seconds'), '.1f')} s",
        f"  final loss  {loss}",
        f"  written to  {out}/  (model, tokenizer, {CONFIG_FILE}, {PLUGINS_FILE}, {METRICS_FILE}, {CURVES_FILE})",
    ]
    if metrics.get("resumed_from"):
        lines.insert(2, f"  resumed     from {metrics['resumed_from']}")
    warnings = metrics.get("warnings") or []
    if warnings:
        lines.append(f"  warnings    {len(warnings)} (also in {METRICS_FILE}):")
        lines += [f"    - {w.get('message', w) if isinstance(w, dict) else w}" for w in warnings]
    click.echo("\n".join(lines))


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
