"""The output directory: one run at a time, and the final outputs written whole or not at all.

``lock_output_dir`` holds an exclusive lock on ``output_dir/.ft-run.lock`` for the whole run, so a
second ``ft run`` there fails at once naming the process that holds it (PID and host) instead of
removing the first run's checkpoint in progress. The lock is the main process's (``RANK`` 0); the
other ranks of the same launch do not take it, so they never lock each other out. It is an OS
file lock (``flock``), released by the kernel when its process dies: a lock file left by a dead
process is simply taken over.

``final_outputs`` writes what a finished run holds into ``output_dir/.ft-tmp-final/``: the weights
(``ft_save_weights``), then ``write_run_files``: the tokenizer, the resolved config
(``ft_config.yaml``), the plugin manifest (``ft_plugins.json``), the metrics (``metrics.json``) and
the loss / learning-rate curves (``training_curves.png``). When every file is written they are moved
into ``output_dir``, ``metrics.json`` last: it marks a finished run. A save that fails (a full disk)
or is killed leaves no ``metrics.json``, so the next ``ft run`` resumes from the last checkpoint and
writes the final outputs again. Only the main process writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from ft import __version__
from ft.engine.checkpoints import (
    SET_ASIDE,
    STAGING_PREFIX,
    discard_set_aside,
    fsync_path,
    last_good_checkpoint,
    put_back_set_aside,
)
from ft.engine.failures import disk_full_error, is_disk_full
from ft.engine.launch import is_main_process
from ft.engine.stopping import resume_command
from ft.kernel.errors import FtError
from ft.kernel.methods import CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

if TYPE_CHECKING:
    from ft.kernel.context import Context

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
METRICS_FILE = "metrics.json"  # written last: a finished run has it
CURVES_FILE = "training_curves.png"
RUN_FILES = (*WEIGHT_FILES, CONFIG_FILE, PLUGINS_FILE, CURVES_FILE, METRICS_FILE)  # what --overwrite replaces
LOCK_FILE = ".ft-run.lock"
FINAL_STAGING = f"{STAGING_PREFIX}final"  # removed like any staging directory when a save did not finish
LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "peft", "bitsandbytes")


def finished_weights(output_dir: str | os.PathLike) -> list[str]:
    """Weight files in ``output_dir`` (empty if none); with ``metrics.json`` they make a finished run."""
    out = Path(output_dir)
    return [name for name in WEIGHT_FILES if (out / name).is_file()]


def is_finished(output_dir: str | os.PathLike) -> bool:
    """Whether ``output_dir`` holds a finished run (its final outputs were all written)."""
    return (Path(output_dir) / METRICS_FILE).is_file()


# -- one run per output directory -------------------------------------------------------------------


@contextlib.contextmanager
def lock_output_dir(cfg: Any) -> Iterator[None]:
    """Hold ``output_dir``'s lock until the run ends (main process only; see the module docstring)."""
    if not is_main_process():
        yield
        return
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise FtError(f"{cfg.where('output_dir')}: '{out}' is a file, not a directory; choose another output_dir.")
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _try_lock(fd)
    except OSError as exc:  # a filesystem without locks: say so, and go on unprotected
        log.warning("cannot lock %s (%s): nothing stops a second run from using this output_dir at the same time",
                    path, exc)
        os.close(fd)
        with _put_back_unless_saved(out):
            yield
        return
    if not locked:
        holder = _describe(_read_holder(path))
        os.close(fd)
        raise FtError(
            f"{cfg.where('output_dir')}: another ft run is using '{out}' ({holder}). Two runs in one output_dir "
            "would remove each other's checkpoints. Wait for that run to end (or stop it), or choose another "
            f"output_dir: --set output_dir={out}-2"
        )
    left = _read_holder(path)
    if left:  # released locks are emptied: this one's process ended without releasing it
        log.info("%s was left by a run that ended without releasing it (%s); taking it over", path, _describe(left))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())
    try:
        with _put_back_unless_saved(out):
            yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty lock file: released
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def _put_back_unless_saved(out: Path) -> Iterator[None]:
    """A run that replaces an earlier one (--overwrite, --fresh) and stops before it saved a checkpoint or its
    final outputs puts the earlier run back as it was (``ft.engine.checkpoints.set_aside``)."""
    try:
        yield
    finally:
        if (out / SET_ASIDE).is_dir():
            restored = put_back_set_aside(out)
            if restored:
                log.warning("this run stopped before it saved anything: the earlier run in %s is put back as it "
                            "was (%s)", out, ", ".join(restored))


def _try_lock(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on ``fd``: True if taken, False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "the process that holds it did not say which it is"
    text = f"PID {holder['pid']} on {holder.get('host', '?')}"
    if holder.get("started"):
        text += f", started {holder['started']}"
    if holder.get("command"):
        text += f": {holder['command']}"
    return text


# -- the final outputs ----------------------------------------------------------------------------------


@dataclass
class FinalOutputs:
    """Where the final outputs are written (``dir``), the files written there, and where they ended up."""

    dir: Path
    out: Path
    files: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)


@contextlib.contextmanager
def final_outputs(ctx: Context, trainer: Any, metrics: dict[str, Any]) -> Iterator[FinalOutputs]:
    """Collect the final outputs in a staging directory; move them into ``output_dir`` when all are written
    (``metrics.json`` last), then print the end-of-run summary. Every rank enters; the main process writes."""
    cfg = ctx.cfg
    out = Path(cfg.output_dir)
    final = FinalOutputs(out / FINAL_STAGING, out)
    main = trainer.is_world_process_zero() if hasattr(trainer, "is_world_process_zero") else is_main_process()
    barrier = getattr(getattr(trainer, "accelerator", None), "wait_for_everyone", lambda: None)
    try:
        if main:
            shutil.rmtree(final.dir, ignore_errors=True)
            final.dir.mkdir(parents=True)
        barrier()  # sharded savers write from every rank: the directory exists before any of them starts
        yield final
        barrier()
        if main:
            final.published = publish_final(final.dir, out, final.files)
    except Exception as exc:
        if main:
            shutil.rmtree(final.dir, ignore_errors=True)
        if is_disk_full(exc):
            good = last_good_checkpoint(out)
            then = (f"Nothing of the run is lost: its checkpoints are intact (newest: {good.path.name}), and the run "
                    f"is not marked finished. Free some space, then run the same command again: it resumes from "
                    f"{good.path.name} and writes the final outputs: {resume_command(cfg)}" if good else
                    "There is no checkpoint to resume from (set save_steps to keep some); free some space and "
                    f"train again: {resume_command(cfg)}")
            raise disk_full_error(out, "the final outputs", then) from exc
        raise
    if main:
        print_summary(metrics, out)


def publish_final(staging: Path, out: Path, files: list[str]) -> list[str]:
    """Move everything in ``staging`` into ``out`` (replacing what is there), ``metrics.json`` last."""
    entries = sorted(staging.iterdir(), key=lambda p: (p.name == METRICS_FILE, p.name))
    for entry in entries:
        target = out / entry.name
        if entry.name == METRICS_FILE:
            fsync_path(out)  # everything else is in place before the run is marked finished
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    fsync_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    discard_set_aside(out)  # a finished run replaces the one --overwrite set aside
    moved = []
    for name in files:
        path = Path(name)
        with contextlib.suppress(ValueError):
            path = out / path.relative_to(staging)
        moved.append(str(path))
    return moved


def write_run_files(ctx: Context, trainer: Any, tokenizer: Any, metrics: dict[str, Any], patches: list[Any],
                    directory: str | os.PathLike | None = None) -> list[str]:
    """Tokenizer, resolved config, plugin manifest, metrics and curves, into ``directory`` (default:
    output_dir). Main process only."""
    from ft.engine.train import history_of

    is_main = trainer.is_world_process_zero() if hasattr(trainer, "is_world_process_zero") else is_main_process()
    if not is_main:
        return []
    out = Path(directory if directory is not None else ctx.cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = history_of(trainer)
    files = [str(p) for p in tokenizer.save_pretrained(str(out))]
    files.append(write_config(ctx, out / CONFIG_FILE))
    files.append(write_plugin_manifest(ctx, patches, out / PLUGINS_FILE))
    files.append(plot_curves(history, out / CURVES_FILE))
    files.append(write_metrics(metrics, history, out / METRICS_FILE))
    return files


def write_config(ctx: Context, path: Path) -> str:
    from ft.engine.record import saveable_config

    cfg = ctx.cfg
    data = saveable_config(cfg)
    header = f"# resolved config written by ft {__version__}" + (f" from {cfg.source}" if cfg.source else "") + "\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return str(path)


def write_plugin_manifest(ctx: Context, patches: list[Any], path: Path) -> str:
    """``ft_plugins.json``: ft's and the libraries' versions, the plugins selected and loaded, the patches applied."""
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
    """``metrics.json``: the summary and the per-step history; a NaN / inf value is written as null."""
    from ft.engine.record import metrics_json

    path.write_text(metrics_json({"summary": metrics, "history": history}) + "\n", encoding="utf-8")
    return str(path)


CORE_SERIES = {"step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "train_tokens", "trained_tokens",
               "tokens_per_second"}
CORE_PANELS = (("loss", ("loss",)), ("gradient norm", ("grad_norm",)), ("learning rate", ("learning_rate",)))
GROUP_TITLES = {"accuracies": "accuracies (0-1)", "logps": "log-probs", "logits": "logits", "kl": "KL",
                "nll": "NLL", "nll_loss": "NLL loss", "log_odds": "log-odds", "rewards": "rewards", "reward": "reward"}
PANEL_COLUMNS = 3


def metric_groups(names: list[str]) -> dict[str, list[str]]:
    """The method's metrics (train names, without ``eval_``) by panel: the prefix before the first ``/``
    (``rewards/chosen`` -> rewards), or before the last ``_`` when another metric shares it (``log_odds_ratio``
    and ``log_odds_chosen`` -> log_odds, ``reward_std`` beside ``reward``); accuracies get their own 0-1 panel."""
    slash_groups = {n.split("/", 1)[0] for n in names if "/" in n}
    groups: dict[str, list[str]] = {}
    for name in names:
        last = name.rsplit("/", 1)[-1]
        if "accurac" in last or last == "acc":
            group = "accuracies"
        elif "/" in name:
            group = name.split("/", 1)[0]
        else:
            stem = name.rsplit("_", 1)[0]
            shared = stem in slash_groups or stem in names or any(
                o != name and "/" not in o and o.rsplit("_", 1)[0] == stem for o in names)
            group = stem if "_" in name and shared else name
        groups.setdefault(group, []).append(name)
    return groups


def plot_curves(history: list[dict[str, Any]], path: Path) -> str:
    """``training_curves.png`` (see ``curves_figure``)."""
    curves_figure(history).savefig(str(path), format="png")
    return str(path)


def curves_figure(history: list[dict[str, Any]]) -> Any:
    """Loss, gradient norm, learning rate and the method's own metrics against the optimizer step: one panel per
    metric group (``metric_groups``), each on its own scale; train solid, eval dashed in the same colour; legends
    below their panel, off the data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = list(dict.fromkeys(k for r in history for k in r))
    extra = [k for k in keys if k not in CORE_SERIES and not k.startswith("eval_")]
    extra += [k[len("eval_"):] for k in keys if k.startswith("eval_") and k not in CORE_SERIES
              and k[len("eval_"):] not in extra]
    groups = metric_groups(extra)
    panels = [*CORE_PANELS, *((GROUP_TITLES.get(g, g.replace("_", " ")), tuple(n)) for g, n in groups.items())]
    columns = min(PANEL_COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(5 * columns, 3.6 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global backend, no GUI
    axes = fig.subplots(rows, columns, squeeze=False).ravel()

    def series(key: str) -> tuple[list[Any], list[Any]]:
        rows_ = [r for r in history if isinstance(r.get(key), (int, float))]
        return [r["step"] for r in rows_], [r[key] for r in rows_]

    any_eval = False
    for ax, (title, names) in zip(axes, panels, strict=False):
        group = next((g for g, n in groups.items() if tuple(n) == names), None)
        for i, name in enumerate(names):
            colour = f"C{i % 10}"
            label = name if group is None or not name.startswith(group) else name[len(group):].lstrip("/_") or name
            steps, values = series(name)
            if values:
                ax.plot(steps, values, "-", color=colour, label=label, marker="." if len(values) < 30 else None)
            steps, values = series(f"eval_{name}")
            if values:
                any_eval = True
                ax.plot(steps, values, "--", color=colour, marker="o", markersize=3,
                        label=label if not ax.get_legend_handles_labels()[1].count(label) else "_nolegend_")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if title.startswith("accuracies"):
            ax.set_ylim(-0.03, 1.03)
        if names == ("learning_rate",):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        labels = ax.get_legend_handles_labels()[1]
        if not ax.lines:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
        elif len(labels) > 1:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(3, len(labels)), fontsize="small",
                      frameon=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if any_eval:
        fig.suptitle("solid: train    dashed: eval", fontsize="small", x=0.99, ha="right")
    return fig


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


# -- the head a saved model was trained with ---------------------------------------------------------

HEAD_SUFFIXES = {"ForSequenceClassification": SEQUENCE_CLASSIFICATION, "ForTokenClassification": TOKEN_CLASSIFICATION}


def architecture_head(name: str) -> str:
    """The head of a transformers class name (``LlamaForSequenceClassification`` -> sequence classification)."""
    return next((head for suffix, head in HEAD_SUFFIXES.items() if name.endswith(suffix)), CAUSAL_LM)


def config_head(config: Any) -> str:
    """The head a saved model was trained with: from its ``config.json`` (a path) or a config object's
    ``architectures`` (``save_pretrained`` writes the model's class); a causal LM when none is named."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        try:
            architectures = json.loads(path.read_text(encoding="utf-8")).get("architectures")
        except (OSError, ValueError, AttributeError) as error:
            raise FtError(f"{path}: not a readable model config ({error}); the model directory is damaged.") from error
    else:
        architectures = getattr(config, "architectures", None)
    return architecture_head(architectures[0]) if architectures else CAUSAL_LM
