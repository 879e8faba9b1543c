"""LoRA adapters (peft): wrap the base model, check the targets, save in the peft layout.

Select with ``plugins: [lora]`` (or ``-p lora``); configure in the ``lora:`` section. With
``qlora`` also selected the base model arrives quantized and is prepared for k-bit training
before the adapter is added. ``ft merge`` (``ft.inference``) folds the saved adapter back in.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.errors import ConfigError, FtError, MissingDependencyError, is_installed

FT_FEATURE = True

log = logging.getLogger("ft.lora")

ALL_LINEAR = "all-linear"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# How the base was quantized while the adapter trained (QLoRA); ft merge / ft infer read it.
BASE_QUANTIZATION_FILE = "base_quantization.json"


class LoraSection(BaseModel):
    """The ``lora:`` section."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, description="Rank of the low-rank update matrices (8-64 is usual).")
    alpha: float = Field(32, description="Scale numerator: updates are scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | str = Field(
        ALL_LINEAR,
        description="Module names to adapt, e.g. [q_proj, v_proj] (a name matches a module whose path ends with "
        "it), or 'all-linear' for every linear layer except the output head.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head] after adding tokens.",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): better quality, slower steps.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    init_from: str | None = Field(
        None,
        description="Directory of an existing adapter (adapter_config.json) to continue training; its own r, alpha "
        "and targets are used.",
    )


@hookimpl
def ft_add_config(registry):
    registry.add("lora", LoraSection)


def section(cfg: Any) -> LoraSection:
    return cfg.section("lora")


def peft_installed() -> bool:
    return is_installed("peft")


@hookimpl
def ft_validate_config(cfg):
    if not peft_installed():
        raise MissingDependencyError("The lora plugin needs peft, which is not installed: pip install 'ft[lora]'.")
    lora = section(cfg)
    problems = []
    if lora.r <= 0:
        problems.append(f"{cfg.where('lora', 'r')}: must be a positive integer (got {lora.r}); 8 to 64 is usual, e.g. r: 16.")
    if lora.alpha <= 0:
        problems.append(f"{cfg.where('lora', 'alpha')}: must be positive (got {lora.alpha}); 1-2x r is usual, e.g. alpha: 32.")
    targets = lora.target_modules
    if isinstance(targets, str) and targets != ALL_LINEAR:
        problems.append(
            f"{cfg.where('lora', 'target_modules')}: must be a list of module names or '{ALL_LINEAR}' (got {targets!r}); "
            f"write target_modules: [{targets}] or target_modules: {ALL_LINEAR}."
        )
    elif isinstance(targets, list) and not targets:
        problems.append(
            f"{cfg.where('lora', 'target_modules')}: is empty, so nothing would train; list module names such as "
            f"[q_proj, v_proj] or use target_modules: {ALL_LINEAR}."
        )
    if lora.init_from:
        from ft.context import resolve_path

        path = resolve_path(cfg, lora.init_from)
        if not (Path(path) / "adapter_config.json").is_file():
            problems.append(
                f"{cfg.where('lora', 'init_from')}: no adapter at {path} (adapter_config.json missing); point it at the "
                "output_dir of an earlier lora run."
            )
    return problems


# -- applying the adapter ------------------------------------------------------------------


def is_quantized(model: Any) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_quantized", False)
    )


@hookimpl
def ft_apply_adapter(cfg, model):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    from ft.context import resolve_path

    lora = section(cfg)
    if is_quantized(model):
        # casts norms to fp32, freezes the base, makes inputs require grad for checkpointing
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs,
        )

    if lora.init_from:
        path = resolve_path(cfg, lora.init_from)
        adapted = PeftModel.from_pretrained(model, path, is_trainable=True)
        log.info("lora: continuing from the adapter in %s (its r, alpha and targets are used)", path)
    else:
        check_modules(cfg, lora, model)
        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            modules_to_save=lora.modules_to_save or None,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            bias=lora.bias,
        )
        try:
            adapted = get_peft_model(model, peft_config)
        except ValueError as exc:  # peft's own checks (e.g. a module type it cannot adapt)
            raise ConfigError([f"{cfg.where('lora')}: peft refused the adapter: {exc}"], cfg.source) from None
    trainable, total = adapted.get_nb_trainable_parameters()
    log.info("lora: training %s of %s parameters (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return adapted


def _matches(name: str, key: str) -> bool:
    """peft's rule for a module name in a list: the full path, or a path ending in ``.key``."""
    return name == key or name.endswith("." + key)


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the model's linear layers (``q_proj``, ``down_proj`` ...), in model order."""
    import torch

    names: dict[str, None] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names[path.rsplit(".", 1)[-1]] = None
    return list(names)


def check_modules(cfg: Any, lora: LoraSection, model: Any) -> None:
    """Every name in target_modules / modules_to_save must match a module of this model."""
    paths = [path for path, _ in model.named_modules() if path]
    problems = []
    targets = [] if lora.target_modules == ALL_LINEAR else list(lora.target_modules)
    missing = [key for key in targets if not any(_matches(p, key) for p in paths)]
    if missing:
        real = linear_module_names(model)
        problems.append(
            f"{cfg.where('lora', 'target_modules')}: {', '.join(missing)} match(es) no module of "
            f"{type(model).__name__}. Its linear layers are named: {', '.join(real[:10]) or 'none'}. "
            f"Use some of those, or target_modules: {ALL_LINEAR}."
        )
    missing = [key for key in lora.modules_to_save if not any(_matches(p, key) for p in paths)]
    if missing:
        leaves = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths if not p.rsplit(".", 1)[-1].isdigit()))
        problems.append(
            f"{cfg.where('lora', 'modules_to_save')}: {', '.join(missing)} match(es) no module of "
            f"{type(model).__name__}. Module names in it include: {', '.join(leaves[:12])}."
        )
    if problems:
        raise ConfigError(problems, cfg.source)


# -- saving --------------------------------------------------------------------------------


@hookimpl(tryfirst=True)
def ft_save_weights(cfg, trainer, model, output_dir):
    from peft import PeftModel

    accelerator = getattr(trainer, "accelerator", None)
    peft_model = accelerator.unwrap_model(model) if accelerator is not None else model
    if not isinstance(peft_model, PeftModel):
        return None  # full fine-tuning: another plugin saves
    _absolute_base_path(peft_model)
    if trainer is None:  # called directly (tests, notebooks)
        if os.environ.get("RANK", "0") != "0":
            return []
        peft_model.save_pretrained(output_dir, safe_serialization=True)
    elif trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(output_dir)  # gathers the shards; writes on the main process only
        if not trainer.is_world_process_zero():
            return []
    else:
        if trainer.is_world_process_zero():
            peft_model.save_pretrained(output_dir, safe_serialization=True)
        trainer.accelerator.wait_for_everyone()
        if not trainer.is_world_process_zero():
            return []
    files = [str(Path(output_dir) / name) for name in ADAPTER_FILES]
    quantization = write_base_quantization(peft_model, output_dir)
    if quantization:
        files.append(quantization)
    for path in files:
        if not Path(path).is_file():
            raise FtError(f"lora: saving the adapter did not write {path}; check that {output_dir} is writable.")
    log.info("lora: adapter saved to %s (merge it into the base with `ft merge %s`)", output_dir, output_dir)
    return files


@hookimpl
def ft_callbacks(cfg):
    from transformers import TrainerCallback

    class RecordBaseQuantization(TrainerCallback):
        """Checkpoints of a QLoRA run also say how the base was quantized (for ft merge / ft infer)."""

        def on_save(self, args, state, control, model=None, **kwargs):
            from peft import PeftModel

            model = getattr(model, "module", model)  # DDP
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and isinstance(model, PeftModel) and checkpoint.is_dir():
                write_base_quantization(model, str(checkpoint))

    return [RecordBaseQuantization()]


def _absolute_base_path(peft_model: Any) -> None:
    """A base model given as a relative local directory is recorded absolute, so ft merge finds it."""
    for peft_config in peft_model.peft_config.values():
        base = peft_config.base_model_name_or_path
        if base and Path(base).is_dir():
            peft_config.base_model_name_or_path = str(Path(base).resolve())


def write_base_quantization(peft_model: Any, output_dir: str) -> str | None:
    """Record the quantization of a quantized base next to the adapter; returns the file or None."""
    import json

    qc = getattr(peft_model.get_base_model().config, "quantization_config", None)
    if qc is None:
        return None
    data = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    path = Path(output_dir) / BASE_QUANTIZATION_FILE
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return str(path)
