"""DeepSpeed ZeRO stages 1-3 through the Hugging Face Trainer's DeepSpeed integration.

Select with ``plugins: [deepspeed]`` and either a short section or a DeepSpeed JSON file:

    deepspeed:                       deepspeed:
      stage: 2                         config: ds_zero3.json
      offload_optimizer: true

The short form becomes a DeepSpeed config whose batch size, precision and clipping are
``"auto"`` (filled in by transformers from the run's settings). Saving goes through
``trainer.save_model``, which gathers the partitioned weights into one consolidated state
dict (ZeRO-3: ``stage3_gather_16bit_weights_on_model_save`` is switched on unless the JSON file
says otherwise). Needs ``pip install 'ft[deepspeed]'``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import ConfigError, MissingDependencyError, Plugin, is_installed

PLUGIN = Plugin(feature=True, provides=["sharding"], loggers=["DeepSpeed"])  # one engine shards the model; transformers imports deepspeed when installed: quiet unless selected

log = logging.getLogger("ft.deepspeed")

INSTALL_HINT = "pip install 'ft[deepspeed]'"
SHORT_KEYS = ("stage", "offload_optimizer", "offload_params")


class DeepspeedSection(BaseModel):
    """The ``deepspeed:`` section."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(
        None, description="Path of a DeepSpeed JSON config, used as it is (\"auto\" values are filled in from the "
        "run); relative paths are taken from the working directory, else next to the config file."
    )
    stage: Literal[1, 2, 3] = Field(
        2, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also the parameters."
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer state in CPU memory and step it there (DeepSpeed's CPU Adam)."
    )
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (stage 3 only).")


def section(cfg: Any) -> DeepspeedSection:
    return cfg.section("deepspeed")


def deepspeed_installed() -> bool:
    return is_installed("deepspeed")


@hookimpl
def ft_add_config(registry):
    registry.add("deepspeed", DeepspeedSection)


@hookimpl
def ft_validate_config(cfg):
    if not deepspeed_installed():
        raise MissingDependencyError(f"The deepspeed plugin needs DeepSpeed, which is not installed: {INSTALL_HINT}.")
    ds = section(cfg)
    problems = []
    if ds.config is not None:
        given = [k for k in SHORT_KEYS if k in ds.model_fields_set]
        if given:
            problems.append(f"{cfg.where('deepspeed', given[0])}: set in the section and also `config: {ds.config}`; "
                            "put it in the JSON file or drop `config`.")
        try:
            stage = zero_stage(load_json(cfg, ds.config))
        except ConfigError as exc:
            return [*problems, *exc.problems]
    else:
        stage = ds.stage
        if ds.offload_params and stage != 3:
            problems.append(f"{cfg.where('deepspeed', 'offload_params')}: parameters are offloaded only with ZeRO "
                            "stage 3; set `stage: 3` or drop offload_params.")
        if ds.offload_optimizer and cfg.optimizer not in ("adamw_torch", "adamw_torch_fused"):
            problems.append(f"{cfg.where('optimizer')}: with deepspeed.offload_optimizer the optimizer is DeepSpeed's "
                            f"CPU Adam(W); optimizer: {cfg.optimizer} cannot be offloaded. Use adamw_torch_fused (the "
                            "default) or drop offload_optimizer.")
    if cfg.provides("quantized_base") and stage == 3:
        problems.append(
            f"{cfg.where('plugins')}: qlora cannot be combined with DeepSpeed ZeRO stage 3, which would partition "
            "the packed 4-bit bitsandbytes weights. Use stage 1 or 2 (deepspeed: {stage: 2}), or drop qlora."
        )
    return problems


def load_json(cfg: Any, path: str) -> dict[str, Any]:
    """The user's DeepSpeed JSON file, with errors that name the file and line."""
    from ft.api import resolve_path

    where = cfg.where("deepspeed", "config")
    resolved = Path(resolve_path(cfg, path))
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read the DeepSpeed config '{resolved}' ({exc.strerror or exc}). "
                           "Check the path."], cfg.source) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{where}: {resolved}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}."],
                          cfg.source) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{where}: {resolved} must hold a JSON object (DeepSpeed's config)."], cfg.source)
    return data


def zero_stage(ds_config: dict[str, Any]) -> int:
    zero = ds_config.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def build_config(ds: DeepspeedSection) -> dict[str, Any]:
    """A DeepSpeed config from the short section; batch, precision and clipping follow the run ("auto")."""
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }
    if ds.offload_optimizer:
        # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam; "auto" takes lr/betas/eps/decay from the run
        config["optimizer"] = {"type": "AdamW", "params": {k: "auto" for k in ("lr", "betas", "eps", "weight_decay")}}
    return config


def resolved_config(cfg: Any) -> dict[str, Any]:
    ds = section(cfg)
    if ds.config is None:
        return build_config(ds)
    config = load_json(cfg, ds.config)
    zero = config.get("zero_optimization")
    if zero_stage(config) == 3 and isinstance(zero, dict):
        if "stage3_gather_16bit_weights_on_model_save" not in zero:
            # consolidated weights on save; without it DeepSpeed writes only its own checkpoint format
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        elif not zero["stage3_gather_16bit_weights_on_model_save"]:
            log.warning("%s: stage3_gather_16bit_weights_on_model_save is false, so the final weights are a DeepSpeed "
                        "checkpoint (zero_to_fp32.py recovers them), not a model from_pretrained loads",
                        cfg.where("deepspeed", "config"))
    return config


@hookimpl
def ft_trainer_args(cfg):
    config = resolved_config(cfg)
    log.info("deepspeed: ZeRO stage %d%s", zero_stage(config),
             " (optimizer offloaded to CPU)" if (config.get("zero_optimization") or {}).get("offload_optimizer") else "")
    return {"deepspeed": config}
