"""What the Trainer is built with: precision and dtypes, the seed, ``TrainingArguments`` derived from the config
(batching, cadences, scheduler, reporters) and the number of steps an epoch takes."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

from ft.kernel.errors import ConfigError, FtError, MissingDependencyError

log = logging.getLogger("ft.train")


def resolve_precision(cfg: Any) -> str:
    """``bf16`` / ``fp16`` / ``fp32`` for this config on this machine (``bf16: auto`` -> fp32 on CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if cfg.fp16 and cfg.bf16 is True:
        raise ConfigError([f"{cfg.where('fp16')}: fp16 and bf16 are both true; choose one (bf16 where the GPU has it)."],
                          cfg.source)
    if cfg.fp16:
        if not cuda:
            raise ConfigError([f"{cfg.where('fp16')}: fp16 mixed precision needs a CUDA GPU; on this machine "
                               "remove it (or use `bf16: auto`)."], cfg.source)
        return "fp16"
    if cfg.bf16 == "auto":
        return "bf16" if bf16_ok else "fp32"
    if cfg.bf16:
        if cuda and not bf16_ok:
            raise ConfigError([f"{cfg.where('bf16')}: this GPU has no bf16 support; use `fp16: true` "
                               "(or `bf16: auto`)."], cfg.source)
        return "bf16"
    return "fp32"


DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip


def torch_dtype_named(name: str) -> Any:
    """The torch dtype a user names (``bf16``, ``float32``, ``torch.float16`` ...); FtError if unknown."""
    import torch

    key = DTYPE_NAMES.get(str(name).lower().replace("torch.", ""))
    if key is None:
        raise FtError(f"unknown dtype '{name}'; use one of float32, bfloat16, float16.")
    return getattr(torch, key)


def torch_dtype(precision: str) -> Any:
    """The dtype weights are loaded in. fp16 training keeps fp32 master weights (the grad scaler needs them)."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def seed_everything(cfg: Any) -> None:
    """Seed Python, numpy and torch (every device) with ``seed`` before the model and adapter are built.

    The Trainer seeds only when it is created, after the adapter's random init (LoRA's ``lora_A``) and
    anything else a plugin builds at random; without this, two runs of one config differ. Called right
    before the model is loaded, so whether the data came from the cache or was built does not matter."""
    from transformers import set_seed

    set_seed(cfg.seed)


def training_arguments(cfg: Any, *, has_eval: bool, steps_per_epoch: int | None = None) -> dict[str, Any]:
    """TrainingArguments fields from the core config (before plugins add theirs).

    ``steps_per_epoch`` (optimizer steps in one epoch of the prepared data) turns
    ``evals_per_epoch`` / ``saves_per_epoch`` into step counts.
    """
    import torch

    from ft.kernel.config_checks import config_warnings

    precision = resolve_precision(cfg)
    for warning in config_warnings(cfg):
        log.warning(warning)
    if cfg.warmup_steps is not None and cfg.warmup_ratio:
        log.warning("%s and warmup_ratio are both set; using warmup_steps=%d", cfg.where("warmup_steps"),
                    cfg.warmup_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio  # a float < 1 is a ratio
    args: dict[str, Any] = {
        "output_dir": cfg.output_dir,
        "per_device_train_batch_size": cfg.micro_batch_size,
        "per_device_eval_batch_size": cfg.eval_batch_size or cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.num_epochs,
        "max_steps": cfg.max_steps or -1,
        "warmup_steps": warmup,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "logging_strategy": "steps",
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
        "save_total_limit": cfg.save_total_limit,
        **cadence_arguments(cfg, has_eval=has_eval, steps_per_epoch=steps_per_epoch),
        "report_to": report_to(cfg),
        "lr_scheduler_kwargs": scheduler_kwargs(cfg),
        "dataloader_num_workers": cfg.dataloader_num_workers,
        "disable_tqdm": bool(os.environ.get("FT_NO_PROGRESS")),  # set by the CLI when stderr is no terminal
        "dataloader_pin_memory": torch.cuda.is_available(),
        "remove_unused_columns": False,  # formats may carry extra columns the collator uses
        "label_names": ["labels"],
    }
    if cfg.gradient_checkpointing:
        # transformers >= 5.2x renamed it activation_checkpointing; older 5.x only knows the old name
        name = "activation_checkpointing" if "activation_checkpointing" in training_fields() else "gradient_checkpointing"
        args[name] = True
        if cfg.gradient_checkpointing_kwargs is not None:
            args[f"{name}_kwargs"] = dict(cfg.gradient_checkpointing_kwargs)
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args["use_cpu"] = True  # accelerate sets up multi-process CPU training (gloo) only when asked to
    if any(getattr(e, "streaming", False) for e in cfg.datasets or []):
        # each rank reads its own shard of the stream (ft.engine.data_stream); accelerate's default for an iterable
        # dataset would read every batch on rank 0 and send it to the others
        args["accelerator_config"] = {"dispatch_batches": False}
    if cfg.tf32 is not None:
        if torch.cuda.is_available():
            args["tf32"] = cfg.tf32
        else:
            log.info("%s: ignored, there is no CUDA GPU", cfg.where("tf32"))
    return args


def train_rows(cfg: Any, train: Any) -> int | None:
    """Rows (or packed bins) an optimizer step draws from, for the batch checks; None for an iterable dataset, or a
    method that batches generated completions (its plugin checks its prompts against its batch)."""
    if cfg.method_supports("generation"):
        return None
    try:
        return len(train)
    except TypeError:
        return None


def launched_world_size() -> int:
    return max(int(os.environ.get("WORLD_SIZE", "1")), 1)


def row_unit(ctx: Any) -> str:
    return "packed bins" if ctx.pm.implementers("ft_pack") else "rows"


def steps_per_epoch(cfg: Any, train: Any) -> int | None:
    """Optimizer steps in one epoch over ``train`` (rows, or packed bins), as the Trainer counts them."""
    try:
        rows = len(train)
    except TypeError:  # an iterable dataset: no epochs to divide
        return None
    world = max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    batches = math.ceil(rows / (cfg.micro_batch_size * world))
    return max(1, math.ceil(batches / cfg.gradient_accumulation_steps))


def cadence_arguments(cfg: Any, *, has_eval: bool, steps_per_epoch: int | None) -> dict[str, Any]:
    """When to evaluate and checkpoint, and which checkpoint is best (TrainingArguments fields).

    ``evals_per_epoch: N`` evaluates every ceil(steps_per_epoch / N) steps, as axolotl does; with
    ``load_best_model_at_end`` checkpoints are put on evaluation steps.
    """

    def every(n_steps: int | None, per_epoch: int | None) -> int | float | None:
        if n_steps:
            return n_steps
        if not per_epoch:
            return None
        if steps_per_epoch:
            return max(1, math.ceil(steps_per_epoch / per_epoch))
        # unknown epoch length: a fraction of the whole run (what the Trainer resolves with max_steps)
        return 1.0 / (per_epoch * cfg.num_epochs) if not cfg.max_steps else max(1, cfg.max_steps // per_epoch)

    args: dict[str, Any] = {}
    eval_every = every(cfg.eval_steps, cfg.evals_per_epoch) if has_eval else None
    save_every = every(cfg.save_steps, cfg.saves_per_epoch)
    if not has_eval or cfg.eval_strategy == "no":
        args["eval_strategy"] = "no"
    elif cfg.eval_strategy == "epoch":
        args["eval_strategy"] = "epoch"
    elif eval_every:
        args["eval_strategy"], args["eval_steps"] = "steps", eval_every
    else:
        args["eval_strategy"] = "no"
    if cfg.save_strategy == "epoch":
        args["save_strategy"] = "epoch"
    elif save_every and cfg.save_strategy != "no":
        if cfg.load_best_model_at_end and cfg.saves_per_epoch and isinstance(eval_every, int) and cfg.evals_per_epoch:
            save_every = eval_every * max(1, cfg.evals_per_epoch // cfg.saves_per_epoch)
        args["save_strategy"], args["save_steps"] = "steps", save_every
    else:
        args["save_strategy"] = "no"
    if (cfg.load_best_model_at_end or cfg.early_stopping_patience) and args["eval_strategy"] != "no":
        args["load_best_model_at_end"] = bool(cfg.load_best_model_at_end)
        args["metric_for_best_model"] = cfg.metric_for_best_model or "eval_loss"
        if cfg.greater_is_better is not None:
            args["greater_is_better"] = cfg.greater_is_better
    return args


def cadence_callbacks(cfg: Any, has_eval: bool) -> list[Any]:
    """Callbacks the cadence settings need (early stopping)."""
    if not (cfg.early_stopping_patience and has_eval):
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)]


def scheduler_kwargs(cfg: Any) -> dict[str, Any]:
    """``lr_scheduler_kwargs`` with ``cosine_min_lr_ratio`` folded in (as ``min_lr_rate``)."""
    kwargs = dict(cfg.lr_scheduler_kwargs or {})
    if cfg.cosine_min_lr_ratio is not None and "min_lr" not in kwargs:
        kwargs.setdefault("min_lr_rate", cfg.cosine_min_lr_ratio)
    return kwargs


def training_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def report_to(cfg: Any) -> list[str] | str:
    """The reporters for TrainingArguments; a missing package is an error with the install command."""
    from ft.kernel.config_checks import reporter_names, reporter_problems

    problems = reporter_problems(cfg)  # checked at validation too; the environment may have changed since
    if problems:
        raise MissingDependencyError("\n".join(problems))
    return reporter_names(cfg) or "none"


def training_arguments_class() -> type:
    from transformers import TrainingArguments

    return TrainingArguments
