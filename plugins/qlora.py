"""QLoRA: load the base model quantized to 4 or 8 bits with bitsandbytes.

This plugin only quantizes the base model; the trainable adapter comes from the ``lora``
plugin, which prepares the quantized model for k-bit training before adding the adapter.
Select both: ``plugins: [lora, qlora]``. The 8-bit optimizers (``adamw_8bit``,
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
    )


@hookimpl
def ft_model_kwargs(cfg):
    import os

    import torch

    kwargs: dict[str, Any] = {"quantization_config": bnb_config(cfg)}
    sharded = cfg.provides("sharding")
    if torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not sharded:
        # data parallel: each process keeps its whole quantized copy on its own GPU
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return kwargs
