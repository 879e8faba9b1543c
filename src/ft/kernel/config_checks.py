"""Checks of the core settings that span keys: reporters that are installed, logging/eval/save cadences that
fit the run, an effective batch size that fits the data, local paths that exist."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from ft.kernel.config import REPORTERS, CoreConfig


def reporter_names(cfg: CoreConfig) -> list[str]:
    """The ``report_to`` values, without ``none``."""
    names = [cfg.report_to] if isinstance(cfg.report_to, str) else list(cfg.report_to)
    return [n for n in names if n and n != "none"]


def reporter_problems(cfg: CoreConfig) -> list[str]:
    """Unknown ``report_to`` values and reporters whose package is missing."""
    problems = []
    for name in reporter_names(cfg):
        if name == "all":
            continue
        if name not in REPORTERS:
            close = difflib.get_close_matches(name, list(REPORTERS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"{cfg.where('report_to')}: unknown reporter '{name}'.{hint} Known: none, all, "
                            f"{', '.join(sorted(REPORTERS))}.")
            continue
        modules, fix = REPORTERS[name]
        if not any(_importable(m) for m in modules):
            problems.append(f"{cfg.where('report_to')}: reporting to {name} needs the '{modules[0]}' package, which "
                            f"is not installed: {fix} (or remove {name} from report_to).")
        if name == "dagshub" and not _importable("mlflow"):
            problems.append(f"{cfg.where('report_to')}: reporting to dagshub also needs mlflow: pip install mlflow.")
    return problems


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cadence_problems(cfg: CoreConfig) -> list[str]:
    """Evaluation, checkpoint and early-stopping settings that contradict each other."""
    problems = []
    has_eval = bool(cfg.val_set_size or cfg.test_datasets)
    for every, per_epoch, strategy in (("eval_steps", "evals_per_epoch", "eval_strategy"),
                                       ("save_steps", "saves_per_epoch", "save_strategy")):
        a, b, mode = getattr(cfg, every), getattr(cfg, per_epoch), getattr(cfg, strategy)
        if a and b:
            problems.append(f"{cfg.where(per_epoch)}: {every} and {per_epoch} both set the cadence; keep one.")
        if mode in ("epoch", "no") and (a or b):
            problems.append(f"{cfg.where(strategy)}: {strategy}: {mode} ignores {every if a else per_epoch}; remove "
                            f"one of them ({strategy}: steps goes with {every} / {per_epoch}).")
        if mode == "steps" and not (a or b):
            problems.append(f"{cfg.where(strategy)}: {strategy}: steps needs {every} or {per_epoch} "
                            f"(e.g. {per_epoch}: 4).")
    evaluates = has_eval and cfg.eval_strategy != "no" and bool(
        cfg.eval_steps or cfg.evals_per_epoch or cfg.eval_strategy == "epoch")
    needs_eval = [k for k in ("early_stopping_patience", "load_best_model_at_end") if getattr(cfg, k)]
    for key in needs_eval:
        if not has_eval:
            problems.append(f"{cfg.where(key)}: needs evaluation data; set val_set_size (e.g. 0.05) or test_datasets.")
        elif not evaluates:
            problems.append(f"{cfg.where(key)}: needs evaluations during training; set evals_per_epoch (e.g. 4), "
                            "eval_steps, or eval_strategy: epoch.")
    if cfg.load_best_model_at_end:
        saves = cfg.save_strategy != "no" and bool(cfg.save_steps or cfg.saves_per_epoch or cfg.save_strategy == "epoch")
        eval_mode = "epoch" if cfg.eval_strategy == "epoch" else "steps"
        save_mode = "epoch" if cfg.save_strategy == "epoch" else "steps"
        if not saves:
            problems.append(f"{cfg.where('load_best_model_at_end')}: needs checkpoints to choose from; set "
                            "saves_per_epoch or save_steps (on evaluation steps), or save_strategy: epoch.")
        elif eval_mode != save_mode:
            problems.append(f"{cfg.where('load_best_model_at_end')}: checkpoints ({save_mode}) and evaluations "
                            f"({eval_mode}) must follow the same strategy, so each checkpoint has a score.")
        elif cfg.save_steps and cfg.eval_steps and cfg.save_steps % cfg.eval_steps:
            problems.append(f"{cfg.where('save_steps')}: with load_best_model_at_end, save_steps ({cfg.save_steps}) "
                            f"must be a multiple of eval_steps ({cfg.eval_steps}), so each checkpoint has a score.")
        elif cfg.saves_per_epoch and cfg.evals_per_epoch and cfg.evals_per_epoch % cfg.saves_per_epoch:
            problems.append(f"{cfg.where('saves_per_epoch')}: with load_best_model_at_end, evals_per_epoch "
                            f"({cfg.evals_per_epoch}) must be a multiple of saves_per_epoch ({cfg.saves_per_epoch}), "
                            "so each checkpoint has a score.")
    if not needs_eval:
        for key in ("metric_for_best_model", "greater_is_better"):
            if getattr(cfg, key) is not None:
                problems.append(f"{cfg.where(key)}: has no effect without early_stopping_patience or "
                                "load_best_model_at_end; set one of them, or remove it.")
    return problems


# Samples (or packed bins) per optimizer step, over every process: far beyond any fine-tuning batch. A larger product
# of micro_batch_size and gradient_accumulation_steps is a typo (1e9) that would divide the loss to nothing.
MAX_EFFECTIVE_BATCH = 1 << 20


def batch_problems(cfg: CoreConfig, world: int = 1) -> list[str]:
    """An effective batch (micro_batch_size x gradient_accumulation_steps x processes) beyond MAX_EFFECTIVE_BATCH."""
    effective = cfg.effective_batch_size(world)
    if effective <= MAX_EFFECTIVE_BATCH:
        return []
    key = "gradient_accumulation_steps" if cfg.gradient_accumulation_steps >= cfg.micro_batch_size else "micro_batch_size"
    return [f"{cfg.where(key)}: the effective batch is {effective:,} samples per optimizer step (micro_batch_size "
            f"{cfg.micro_batch_size:,} x gradient_accumulation_steps {cfg.gradient_accumulation_steps:,} x {world} "
            f"process(es)); at most {MAX_EFFECTIVE_BATCH:,} are allowed. Fine-tuning batches are tens to thousands: "
            "lower it."]


def real_effective_batch(cfg: CoreConfig, rows: int | None, world: int = 1) -> int:
    """Samples in one optimizer step as training takes them: the configured effective batch, or the whole epoch when
    the data holds fewer rows (an optimizer step then ends with the epoch)."""
    effective = cfg.effective_batch_size(world)
    return effective if rows is None else max(1, min(effective, rows))


def batch_warnings(cfg: CoreConfig, rows: int | None, world: int = 1, unit: str = "rows") -> list[str]:
    """What the prepared data (``rows`` training rows, or packed bins) does to the batch the config asks for."""
    if rows is None or rows <= 0:
        return []
    per_batch, effective = cfg.micro_batch_size * world, cfg.effective_batch_size(world)
    if rows < per_batch:
        return [f"{cfg.where('micro_batch_size')}: the training data has {rows:,} {unit}, fewer than one batch of "
                f"micro_batch_size {cfg.micro_batch_size:,} x {world} process(es) = {per_batch:,}: every optimizer step "
                f"is the whole epoch, so the effective batch is {rows:,}, not {effective:,}. Lower micro_batch_size to "
                f"{max(1, rows // world):,} or less (and gradient_accumulation_steps to 1), or add data."]
    if rows < effective:
        fits = max(1, rows // per_batch)
        return [f"{cfg.where('gradient_accumulation_steps')}: the training data has {rows:,} {unit}, fewer than one "
                f"effective batch ({cfg.micro_batch_size:,} x {cfg.gradient_accumulation_steps:,} x {world} = "
                f"{effective:,}): every optimizer step is the whole epoch, so the effective batch is {rows:,}, not "
                f"{effective:,}. Lower gradient_accumulation_steps to {fits:,} or less, or add data."]
    return []


def config_warnings(cfg: CoreConfig) -> list[str]:
    """Settings that are valid but probably not meant (``ft validate`` prints them, ``ft run`` logs them)."""
    out = []
    if cfg.max_steps is not None and cfg.warmup_steps is not None and cfg.warmup_steps >= cfg.max_steps:
        out.append(f"{cfg.where('warmup_steps')}: {cfg.warmup_steps} warmup steps but max_steps is {cfg.max_steps}: "
                   "the learning rate never reaches learning_rate. Lower warmup_steps (or use warmup_ratio).")
    return out


DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".csv", ".tsv", ".arrow", ".txt", ".gz")


def _looks_local(value: str, data: bool = False) -> bool:
    """A path on this machine, not a hub id (``org/name``) or a URL."""
    if "://" in value:
        return False
    return value.startswith(("/", "./", "../", "~", ".\\")) or (data and value.lower().endswith(DATA_SUFFIXES))


def missing_local_paths(cfg: CoreConfig) -> list[str]:
    """Local base_model / tokenizer / dataset paths that do not exist (``ft validate`` reports them; ``ft run``
    would fail on them after loading). Relative paths count from the working directory or the config's folder,
    as ``ft run`` reads them; hub ids pass."""
    def exists(value: str) -> bool:
        p = Path(value).expanduser()
        return p.exists() or (not p.is_absolute() and cfg.source is not None and (Path(cfg.source).parent / p).exists())

    out = []
    for key in ("base_model", "tokenizer"):
        value = getattr(cfg, key, None)
        if isinstance(value, str) and _looks_local(value) and not exists(value):
            out.append(f"{cfg.where(key)}: '{value}' is a local path that does not exist; fix the path, or give a "
                       "hub id (org/name).")
    for group in ("datasets", "test_datasets"):
        for i, entry in enumerate(getattr(cfg, group, None) or []):
            path = getattr(entry, "path", None)
            if isinstance(path, str) and path.startswith("file://"):
                path = path[len("file://"):]
            if isinstance(path, str) and _looks_local(path, data=True) and not exists(path):
                out.append(f"{cfg.where(group, i, 'path')}: file '{path}' not found (looked in {os.getcwd()}"
                           + (f" and next to {cfg.source}" if cfg.source else "") + "). Check the path.")
    return out


def streaming_problems(cfg: CoreConfig) -> list[str]:
    """A ``streaming: true`` dataset entry with settings a stream cannot honour: no max_steps (a stream has no
    length to count epochs by), a held-out split or weights (both need every row up front), an evaluation set that
    streams, or training entries of which only some stream."""
    streamed = [i for i, e in enumerate(cfg.datasets or []) if getattr(e, "streaming", False)]
    out = [f"{cfg.where('test_datasets', i, 'streaming')}: evaluation datasets are not streamed (each evaluation "
           "reads the whole set); remove streaming: true here."
           for i, e in enumerate(cfg.test_datasets or []) if getattr(e, "streaming", False)]
    if not streamed:
        return out
    first = cfg.where("datasets", streamed[0], "streaming")
    if cfg.max_steps is None:
        out.append(f"{first}: a streaming dataset has no length to count epochs by, so the run needs max_steps: "
                   "set max_steps: N (optimizer steps), or remove streaming: true.")
    out.extend(f"{cfg.where('datasets', i)}: this entry is not streaming but datasets[{streamed[0]}] is; a run streams "
               "every training dataset or none (mixing is not supported): set streaming: true here too, or remove it "
               "there." for i, e in enumerate(cfg.datasets or []) if not getattr(e, "streaming", False))
    if cfg.val_set_size:
        out.append(f"{cfg.where('val_set_size')}: val_set_size holds rows out of the training data, which a stream "
                   f"({first}) never has whole; give the evaluation set as test_datasets instead.")
    out.extend(f"{cfg.where('datasets', i, 'weight')}: weight is not supported with streaming (it needs the row "
               "counts up front); remove it." for i in streamed if getattr(cfg.datasets[i], "weight", None))
    return out
