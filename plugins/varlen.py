"""Variable-length attention: packed rows cost only their real tokens, and stay exact.

Selected with ``-p varlen`` (usually next to ``-p packing``). The model attends with one
attention call over all tokens of a micro-batch, cut into sequences by ``cu_seq_lens``
(cumulative sequence lengths) instead of a ``batch x L x L`` mask:

- on a CUDA GPU with fp16/bf16 activations: ``flash_attn.flash_attn_varlen_func`` when
  flash-attn is installed, else ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10);
- elsewhere (CPU, fp32): an exact reference that runs causal SDPA sequence by sequence.

Sequence boundaries come from ``position_ids`` (a new sequence starts wherever the position
does not follow the previous one, the rule transformers uses) and, when a 2D
``attention_mask`` is given, wherever it switches between padding and tokens, so padding
never mixes with real tokens. A forward pre-hook on the decoder computes them once per
forward pass (outside any compiled graph) and passes them down as the ``cu_seq_lens_q/k``,
``max_length_q/k`` keyword arguments transformers already forwards to attention functions.

The attention function is registered in transformers' global ``AttentionInterface`` (a
global patch): the record's ``undo`` restores the model's previous attention, removes the
hook and unregisters the function when the run ends.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import FtError, MissingDependencyError, Plugin

PLUGIN = Plugin(feature=True, provides=["varlen_attention"])  # attention cut at position_ids: packed rows need no mask

ATTENTION_NAME = "ft_varlen"
NAME = "varlen"  # the plugin's name: its config section and its patch records
REFERENCE_MASK_TOKENS = 4096  # the CPU/fp32 reference builds a tokens x tokens mask up to this size

log = logging.getLogger("ft.varlen")


class VarlenOptions(BaseModel):
    """The ``varlen:`` section."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "flash_attn", "torch", "reference"] = Field(
        "auto",
        description="Kernel on CUDA: auto (flash_attn if installed, else torch's varlen_attn), flash_attn, torch, "
        "or reference (exact per-sequence SDPA; what CPU and fp32 always use).",
    )


def options(cfg: Any) -> VarlenOptions:
    return cfg.section(NAME)


@hookimpl
def ft_add_config(registry):
    registry.add(NAME, VarlenOptions)


@hookimpl
def ft_validate_config(cfg):
    if not cfg.provides("packing"):
        log.info("varlen is selected without packing: each row is one sequence, padding is cut off by the mask")
    return None


@hookimpl
def ft_patch_model(cfg, model):
    from ft.api import PatchRecord

    decoder = _decoder_of(model)
    cuda_kernel = resolve_cuda_kernel(options(cfg).backend)
    previous = model.config._attn_implementation
    attention = make_attention(cuda_kernel)

    from transformers import AttentionInterface

    mapping = AttentionInterface._global_mapping
    had, old = ATTENTION_NAME in mapping, mapping.get(ATTENTION_NAME)
    AttentionInterface.register(ATTENTION_NAME, attention)
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except Exception:
        _restore_mapping(mapping, had, old)
        raise
    if model.config._attn_implementation != ATTENTION_NAME:  # transformers only warned
        _restore_mapping(mapping, had, old)
        raise FtError(
            f"varlen: {type(model).__name__} does not let ft choose its attention function (it does not use "
            "transformers' AttentionInterface); deselect varlen for this model."
        )
    handle = decoder.register_forward_pre_hook(add_varlen_kwargs, with_kwargs=True)

    def undo() -> None:
        handle.remove()
        if model.config._attn_implementation == ATTENTION_NAME:
            model.set_attn_implementation(previous)
        _restore_mapping(mapping, had, old)

    def attention_in_use() -> str | None:  # checked after the first training step
        if model.config._attn_implementation != ATTENTION_NAME:
            return f"the model's attention is '{model.config._attn_implementation}' again, not {ATTENTION_NAME}"
        return None

    def hook_in_place() -> str | None:
        return None if handle.id in decoder._forward_pre_hooks else f"the {type(decoder).__name__} pre-hook was removed"

    def registered() -> str | None:
        if mapping.get(ATTENTION_NAME) is attention:
            return None
        return f"transformers.AttentionInterface['{ATTENTION_NAME}'] was replaced after varlen registered it"

    kernel = getattr(cuda_kernel, "label", "reference")
    return [
        PatchRecord(NAME, f"{type(model).__name__} attention '{previous}'",
                    f"{ATTENTION_NAME} (CUDA: {kernel}; CPU/fp32: reference)", check=attention_in_use),
        PatchRecord(NAME, f"{type(decoder).__name__} forward pre-hook", "cu_seq_lens from position_ids",
                    check=hook_in_place),
        PatchRecord(NAME, f"transformers.AttentionInterface['{ATTENTION_NAME}']", attention.__qualname__, undo=undo,
                    check=registered),
    ]


def _restore_mapping(mapping: dict, had: bool, old: Any) -> None:
    if had:
        mapping[ATTENTION_NAME] = old
    else:
        mapping.pop(ATTENTION_NAME, None)


def _decoder_of(model: Any) -> Any:
    """The decoder stack (``LlamaModel`` in ``LlamaForCausalLM``): always called through ``__call__``.

    PEFT calls the top model's ``forward`` directly, which skips hooks on it; the inner
    decoder is called normally, so its pre-hook fires with or without an adapter.
    """
    prefix = getattr(model, "base_model_prefix", "")
    decoder = getattr(model, prefix, None) if prefix else None
    if decoder is None or decoder is model or not hasattr(model, "set_attn_implementation"):
        raise FtError(
            f"varlen: {type(model).__name__} is not a transformers causal LM with a decoder stack "
            f"(model.{prefix or 'model'}); deselect varlen for this model."
        )
    return decoder


# -- sequence boundaries -----------------------------------------------------------------------


def sequence_starts(position_ids: Any, attention_mask: Any = None) -> Any:
    """Boolean ``(batch, length)``: True where a new sequence starts.

    Every row starts a sequence; inside a row a sequence starts where the position is not
    the previous one plus one, or where a 2D ``attention_mask`` switches between 0 and 1.
    """
    import torch

    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if attention_mask is not None:
        mask = attention_mask.to(torch.bool)
        starts[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    return starts


def cu_seqlens_from_starts(starts: Any) -> tuple[Any, int]:
    """Cumulative sequence lengths (int32, ``[0, ..., batch*length]``) and the longest sequence."""
    import torch

    flat = starts.reshape(-1)
    first = flat.nonzero().flatten()
    total = torch.tensor([flat.numel()], device=flat.device, dtype=first.dtype)
    cu = torch.cat([first, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def cu_seqlens_from_position_ids(position_ids: Any, attention_mask: Any = None) -> tuple[Any, int]:
    """``(cu_seq_lens, max_length)`` for rows of packed sequences, flattened batch-major."""
    return cu_seqlens_from_starts(sequence_starts(position_ids, attention_mask))


def _varlen_kwargs(args: tuple, kwargs: dict) -> dict | None:
    import torch

    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        return None
    batch, length = ref.shape[0], ref.shape[1]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, device=ref.device).unsqueeze(0)
    position_ids = position_ids.to(ref.device).expand(batch, length)
    mask = kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == (batch, length)):
        mask = None  # a 4D mask or none: boundaries come from position_ids alone
    cu, longest = cu_seqlens_from_position_ids(position_ids, mask)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _disable_compile(fn: Callable) -> Callable:
    import torch

    return torch.compiler.disable(fn)


def add_varlen_kwargs(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on the decoder: add ``cu_seq_lens_q/k`` and ``max_length_q/k`` once per forward."""
    if kwargs.get("cu_seq_lens_q") is not None:  # the collator already sent them
        return None
    extra = _compute_kwargs(args, kwargs)
    if extra is None:
        return None
    return args, {**kwargs, **extra}


_compute_kwargs_compiled: Callable | None = None


def _compute_kwargs(args: tuple, kwargs: dict) -> dict | None:
    # Data-dependent (nonzero, max): keep it out of torch.compile graphs.
    global _compute_kwargs_compiled
    if _compute_kwargs_compiled is None:
        _compute_kwargs_compiled = _disable_compile(_varlen_kwargs)
    return _compute_kwargs_compiled(args, kwargs)


# -- kernels -------------------------------------------------------------------------------------


class CudaKernel:
    """A varlen kernel for CUDA tensors: ``(q, k, v, cu, max_len, scale, dropout) -> out`` on (T, H, D)."""

    def __init__(self, label: str, fn: Callable[..., Any]):
        self.label, self.fn = label, fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def torch_varlen_available() -> bool:
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return hasattr(varlen, "varlen_attn")


def resolve_cuda_kernel(backend: str) -> CudaKernel | None:
    """The kernel used for CUDA fp16/bf16 tensors (None: the reference everywhere)."""
    if backend == "reference":
        return None
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if backend == "flash_attn" and not has_flash:
        raise MissingDependencyError(
            "varlen.backend is flash_attn but flash-attn is not installed: pip install flash-attn "
            "(or set varlen.backend: auto to use torch's varlen attention)."
        )
    if backend in ("auto", "flash_attn") and has_flash:
        return CudaKernel("flash_attn", _flash_varlen)
    if not torch_varlen_available():
        if backend == "torch":
            raise MissingDependencyError(
                "varlen.backend is torch but this torch has no torch.nn.attention.varlen.varlen_attn "
                "(torch >= 2.10 has it): upgrade torch or pip install flash-attn."
            )
        return None
    return CudaKernel("torch.varlen_attn", _make_torch_varlen())


def _flash_varlen(q, k, v, cu, max_len, scale, dropout):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale,
                                  causal=True)


def _make_torch_varlen() -> Callable[..., Any]:
    """Adapt to the signature of this torch's ``varlen_attn`` (it changed between 2.10 and 2.13)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    native_gqa = "enable_gqa" in params
    has_scale = "scale" in params

    def call(q, k, v, cu, max_len, scale, dropout):
        if dropout:
            raise FtError("varlen: torch's varlen_attn has no attention dropout; use flash-attn or set the "
                          "model's attention_dropout to 0.")
        extra = dict(causal)
        if has_scale:
            extra["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise FtError("varlen: this torch's varlen_attn has no scale argument and the model scales attention "
                          "differently; install flash-attn or a newer torch.")
        if k.shape[1] != q.shape[1]:
            if native_gqa:
                extra["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)

    return call


def reference_varlen(q: Any, k: Any, v: Any, cu: Any, scale: float, dropout: float = 0.0) -> Any:
    """Exact causal attention within each sequence, with SDPA: the CPU/fp32 path and the tests' yardstick.

    ``q`` is ``(tokens, heads, dim)``, ``k``/``v`` ``(tokens, kv_heads, dim)``; returns ``(tokens, heads, dim)``.
    Up to ``REFERENCE_MASK_TOKENS`` tokens it is one SDPA call with a block-diagonal causal mask;
    beyond, one call per sequence (no ``tokens x tokens`` mask).
    """
    import torch
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, tokens, dim)
    tokens = q.shape[1]
    if tokens <= REFERENCE_MASK_TOKENS:
        lengths = (cu[1:] - cu[:-1]).to(device=q.device, dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
        allowed = (seq[:, None] == seq[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, dropout_p=dropout)
        return out.transpose(0, 1)
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        out[:, start:end] = F.scaled_dot_product_attention(
            q[:, start:end], k[:, start:end], v[:, start:end], is_causal=True, scale=scale, dropout_p=dropout
        )
    return out.transpose(0, 1)


def make_attention(cuda_kernel: CudaKernel | None) -> Callable[..., Any]:
    """The function registered as ``ft_varlen`` in transformers' ``AttentionInterface``."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                 sliding_window=None, softcap=None, **kwargs):
        batch, heads, length, dim = query.shape
        if key.shape[2] != length or not getattr(module, "is_causal", True):
            # a KV cache (generation) or a bidirectional layer: plain SDPA is right there
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        if cu is None:  # called without the decoder's hook (a module used on its own)
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(length, device=query.device).unsqueeze(0)
            cu, max_len = cu_seqlens_from_position_ids(position_ids.expand(batch, length))
        if softcap is not None:
            raise FtError("varlen: this model soft-caps attention logits, which varlen does not do; deselect varlen.")
        if sliding_window is not None and int(max_len) > int(sliding_window):
            raise FtError(f"varlen: this model uses sliding-window attention ({sliding_window} tokens) and a "
                          f"sequence has {int(max_len)}; deselect varlen or use shorter sequences.")
        scale = scaling if scaling is not None else dim**-0.5
        q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
        if cuda_kernel is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            # max_len stays as given: int() would specialise a dynamic shape under torch.compile
            out = cuda_kernel(q, k, v, cu.to(q.device), max_len, scale, float(dropout))
        else:
            out = reference_varlen(q, k, v, cu, scale, float(dropout))
        return out.view(batch, length, heads, dim), None

    return varlen_attention_forward
