"""The output directory: guard a finished run, then write what a user reads after training.

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
from ft.errors import FtError

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


def prepare_output_dir(ctx: Context, fresh: bool = False, overwrite: bool = False, **_: Any) -> Path:
    """Create the output directory; refuse to overwrite a finished run's weights without ``overwrite``."""
    cfg = ctx.cfg
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise FtError(f"{cfg.where('output_dir')}: '{out}' is a file, not a directory; choose another output_dir.")
    found = finished_weights(out)
    if found and not overwrite:
        raise FtError(
            f"{cfg.where('output_dir')}: '{out}' already holds the weights of a finished run ({', '.join(found)}). "
            "Pass --overwrite to train again and replace them, or set another output_dir "
            f"(e.g. --set output_dir={out}-2)."
        )
    if found:
        log.warning("--overwrite: the weights in %s (%s) will be replaced", out, ", ".join(found))
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    from ft.checkpoints import prepare_checkpoints

    # leftovers of crashed saves go; --fresh clears old checkpoints; another config's checkpoints are an error
    prepare_checkpoints(ctx, fresh=fresh, overwrite=overwrite, finished=bool(found), main=is_main_process())
    return out


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


def saveable_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data: secrets redacted, local model and data paths made absolute."""
    from ft.context import resolve_path

    data = cfg.to_saveable()

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value:
            local = Path(resolve_path(cfg, value))
            if local.exists():
                return str(local.resolve())
        return value

    for key in ("base_model", "tokenizer"):  # a local path stays valid from anywhere
        data[key] = absolute(data.get(key))
    for key in ("datasets", "test_datasets"):
        for entry in data.get(key) or []:
            if isinstance(entry, dict) and "path" in entry:
                entry["path"] = absolute(entry["path"])
    return data


def write_config(ctx: Context, path: Path) -> str:
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


CORE_SERIES = {"step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "train_tokens", "trained_tokens",
               "tokens_per_second"}


def plot_curves(history: list[dict[str, Any]], path: Path) -> str:
    """Loss (train and eval), learning rate and the method's own metrics against the optimizer step, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    extra = list(dict.fromkeys(k for r in history for k in r if k not in CORE_SERIES))
    fig = Figure(figsize=(15 if extra else 10, 4), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global backend, no GUI
    axes = fig.subplots(1, 3 if extra else 2)
    ax_loss, ax_lr = axes[0], axes[1]

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
    titled = [(ax_loss, "loss"), (ax_lr, "learning rate")]
    if extra:  # the method's metrics (rewards/margins, kl ...), each its own line
        ax_method = axes[2]
        for key in extra:
            steps, values = series(key)
            ax_method.plot(steps, values, "o-" if key.startswith("eval_") else "-", label=key,
                           marker="." if len(values) < 30 else None)
        ax_method.legend(fontsize="small")
        titled.append((ax_method, "method metrics"))
    for ax, title in titled:
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
