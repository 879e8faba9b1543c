"""QLoRA: load the base model quantized to 4 or 8 bits with bitsandbytes.

This plugin only quantizes the base model; the trainable adapter comes from the ``lora``
plugin, which prepares the quantized model for k-bit training before adding the adapter.
Select both: ``plugins: [lora, qlora]``; add ``fsdp`` to shard the 4-bit base across processes
(QLoRA + FSDP2: the packed weights are then stored in the compute dtype). The 8-bit optimizers (``adamw_8bit``,
``adamw_bnb_8bit``) are registered by the ``optimizers`` plugin.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import MissingDependencyError, Plugin, is_installed

PLUGIN = Plugin(feature=True, provides=["quantized_base"], loggers=["bitsandbytes"])  # its import-time warnings stay quiet unless qlora is selected

INSTALL_HINT = "pip install 'ft[qlora]'"


class QloraSection(BaseModel):
    """The ``qlora:`` section."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = Field(4, description="Bits per base weight: 4 (QLoRA) or 8 (LLM.int8).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (normal float, the QLoRA default) or fp4.")
    double_quant: bool = Field(True, description="Also quantize the 4-bit quantization constants (saves ~0.4 bit/weight).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the matmuls on dequantized weights; auto = bfloat16 with bf16 training or a GPU that "
        "supports it, float16 with fp16, else float32.",
    )


@hookimpl
def ft_add_config(registry):
    registry.add("qlora", QloraSection)


def bitsandbytes_installed() -> bool:
    return is_installed("bitsandbytes")


@hookimpl
def ft_validate_config(cfg):
    if not bitsandbytes_installed():
        raise MissingDependencyError(
            f"The qlora plugin quantizes with bitsandbytes, which is not installed: {INSTALL_HINT}."
        )
    problems = []
    if not cfg.provides("adapter"):
        problems.append(
            f"{cfg.where('plugins')}: qlora only quantizes the base model; add lora to plugins "
            "(plugins: [lora, qlora]) so that an adapter is trained on top of it."
        )
    q = cfg.section("qlora")
    if q.bits == 8 and cfg.provides("sharded_parameters"):
        problems.append(
            f"{cfg.where('qlora', 'bits')}: 8-bit (LLM.int8) weights cannot be sharded by "
            f"{' and '.join(cfg.providers('sharded_parameters'))}: bitsandbytes keeps their scales outside the weight, "
            "and the gathered shards arrive without them. Use qlora.bits: 4 (QLoRA shards), or keep 8 bits "
            "without sharding (plain data parallel, or deepspeed ZeRO stage 1 or 2)."
        )
    if q.bits == 8:
        for key in ("quant_type", "double_quant"):
            if key in q.model_fields_set:
                problems.append(f"{cfg.where('qlora', key)}: applies to 4-bit only; remove it or set qlora.bits: 4.")
    return problems


def compute_dtype(cfg: Any, q: QloraSection) -> Any:
    import torch

    if q.compute_dtype != "auto":
        return getattr(torch, q.compute_dtype)
    if cfg.bf16 is True:
        return torch.bfloat16
    if cfg.fp16:
        return torch.float16
    if cfg.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def storage_dtype(cfg: Any, q: QloraSection) -> Any:
    """dtype the packed 4-bit values are stored in (bitsandbytes' ``quant_storage``).

    uint8, unless a plugin shards every parameter (fsdp): it splits and gathers the packed weights
    like the others and casts them to the compute dtype, so they are stored in that dtype already
    (the bytes are the same; the cast is then a no-op), as peft and bitsandbytes document for FSDP.
    """
    import torch

    if cfg.provides("sharded_parameters"):
        return compute_dtype(cfg, q)
    return torch.uint8


def bnb_config(cfg: Any) -> Any:
    """The ``BitsAndBytesConfig`` for this run's ``qlora:`` section."""
    from transformers import BitsAndBytesConfig

    q = cfg.section("qlora")
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg, q),
        bnb_4bit_quant_storage=storage_dtype(cfg, q),
    )


@hookimpl
def ft_model_kwargs(cfg):
    import os

    import torch

    kwargs: dict[str, Any] = {"quantization_config": bnb_config(cfg)}
    # deepspeed places the model itself; with plain data parallel each process keeps its whole quantized
    # copy on its own GPU, and with fsdp it quantizes there too (fast), then keeps only its shards
    placed_by_engine = cfg.provides("sharding") and not cfg.provides("sharded_parameters")
    if torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not placed_by_engine:
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return kwargs
