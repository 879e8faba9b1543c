"""Liger kernels (Triton, CUDA only): fused RMSNorm, RoPE, SwiGLU and linear + cross-entropy.

Selected with ``-p liger``. For the architectures in ``SUPPORTED`` it calls Liger's
``apply_liger_kernel_to_<arch>(model=...)``, which patches the loaded model instance (its norms,
MLPs and ``forward``) but also rebinds functions and classes in the transformers modelling
module (``apply_rotary_pos_emb``, ``LlamaRMSNorm``, ``LlamaMLP`` ...). Those module-level
changes are found by comparing the module before and after, recorded, and undone when the run
ends, so another run in the same process (or a test) never sees them.

The fused linear + cross-entropy never materialises the ``tokens x vocab`` logits in training,
which is most of the activation memory of a 128k-vocabulary model.

Liger binds ``forward`` on the norm and MLP instances. transformers' hub kernels would drop the
norms' at the first ``model.train()`` (RMSNorm is a hub-kernel layer), so ``hf.use_kernels: true``
with ``liger.rms_norm`` is refused; ft's model load keeps hub kernels off, and the core checks after
the first training step that every bound forward ran (docs/writing-a-kernel-plugin.md).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import FtError, MissingDependencyError, Plugin, is_installed

PLUGIN = Plugin(feature=True, provides=["fused_kernels"])  # replaces modules' forward functions
NAME = "liger"  # the plugin's name: its config section and its patch records

log = logging.getLogger("ft.liger")

# model_type -> Liger function; each takes rope, cross_entropy, fused_linear_cross_entropy,
# rms_norm, swiglu and model (checked against liger-kernel 0.8.5).
SUPPORTED = {
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen2": "apply_liger_kernel_to_qwen2",
    "qwen3": "apply_liger_kernel_to_qwen3",
}


class LigerOptions(BaseModel):
    """The ``liger:`` section: which kernels to use."""

    model_config = ConfigDict(extra="forbid")

    rope: bool = Field(True, description="Liger's rotary position embedding kernel.")
    rms_norm: bool = Field(True, description="Liger's RMSNorm kernel.")
    swiglu: bool = Field(True, description="Liger's SwiGLU MLP kernel.")
    fused_linear_cross_entropy: bool = Field(
        True, description="Fuse the LM head and the cross-entropy loss; logits are not materialised in training."
    )


def options(cfg: Any) -> LigerOptions:
    return cfg.section(NAME)


@hookimpl
def ft_add_config(registry):
    registry.add(NAME, LigerOptions)


@hookimpl
def ft_validate_config(cfg):
    hf = cfg.section("hf")
    if getattr(hf, "use_kernels", False) and options(cfg).rms_norm:
        return [
            f"{cfg.where('hf', 'use_kernels')}: true together with liger's RMSNorm: transformers' hub kernels replace "
            "the forward of every RMSNorm at each train()/eval() switch, so Liger's RMSNorm would never run. Set "
            "`hf: {use_kernels: false}` (the default), or `liger: {rms_norm: false}`."
        ]
    return None


@hookimpl
def ft_patch_model(cfg, model):
    model_type = check_usable(model)
    opts = options(cfg)
    apply = liger_apply_function(model_type)
    watched = _watched_namespaces(model)
    before = [dict(vars(ns)) for _, ns in watched]
    try:
        apply(rope=opts.rope, cross_entropy=False, fused_linear_cross_entropy=opts.fused_linear_cross_entropy,
              rms_norm=opts.rms_norm, swiglu=opts.swiglu, model=model)
    finally:
        global_records = _global_changes(watched, before)
    return [*_instance_records(model), *global_records]


# -- can it run here? ----------------------------------------------------------------------------


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_usable(model: Any) -> str:
    """The model type, or an FtError saying in one sentence why Liger cannot be used here."""
    if not cuda_available():
        raise FtError(
            "liger: Liger kernels are Triton GPU kernels and this machine has no CUDA GPU; "
            "deselect liger (remove it from `plugins:` / `-p liger`) to train here."
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise FtError(
            f"liger: model type '{model_type}' ({type(model).__name__}) is not supported by the liger plugin "
            f"(supported: {', '.join(sorted(SUPPORTED))}); deselect liger for this model."
        )
    if not is_installed("liger_kernel"):
        raise MissingDependencyError(
            "liger: the liger-kernel package is not installed: pip install 'ft[liger]'."
        )
    return model_type


def liger_apply_function(model_type: str) -> Callable[..., None]:
    from liger_kernel.transformers import monkey_patch

    return getattr(monkey_patch, SUPPORTED[model_type])


# -- what changed ----------------------------------------------------------------------------------


def _watched_namespaces(model: Any) -> list[tuple[str, Any]]:
    """Module-level namespaces Liger may rebind: the modelling module, its classes, the loss module."""
    names = [type(model).__module__, "transformers.loss.loss_utils"]
    watched: list[tuple[str, Any]] = []
    for name in names:
        module = sys.modules.get(name)
        if module is None:
            continue
        watched.append((name, module))
        for attr, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == name:
                watched.append((f"{name}.{attr}", value))
    import torch.nn.functional

    watched.append(("torch.nn.functional", torch.nn.functional))  # Liger's cross_entropy patch lands here
    return watched


_MISSING = object()


def _global_changes(watched: list[tuple[str, Any]], before: list[dict[str, Any]]) -> list[Any]:
    from ft.api import PatchRecord

    records = []
    for (name, namespace), old in zip(watched, before, strict=True):
        now = dict(vars(namespace))
        for key in sorted(set(old) | set(now)):
            was, new = old.get(key, _MISSING), now.get(key, _MISSING)
            if was is new:
                continue
            records.append(PatchRecord(NAME, f"{name}.{key}", _describe(new), undo=_restorer(namespace, key, was),
                                       check=_still(namespace, key, new, f"{name}.{key}")))
    return records


def _still(namespace: Any, key: str, new: Any, target: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if vars(namespace).get(key, _MISSING) is new:
            return None
        return f"{target} is no longer Liger's {_describe(new)} (something rebound it after Liger)"

    return check


def _restorer(namespace: Any, key: str, old: Any) -> Callable[[], None]:
    def undo() -> None:
        if old is _MISSING:
            if key in vars(namespace):
                delattr(namespace, key)
        else:
            setattr(namespace, key, old)

    return undo


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "<removed>"
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}".lstrip(".")


def _instance_records(model: Any) -> list[Any]:
    """Modules of this model whose ``forward`` Liger bound on the instance, counted by class."""
    from ft.api import PatchRecord

    counts: dict[tuple[str, str], int] = {}
    for _, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if forward is None:
            continue
        target = _describe(getattr(forward, "__func__", forward))
        if not target.startswith("liger_kernel"):
            continue  # another plugin's change, recorded by that plugin
        key = (type(module).__name__, target)
        counts[key] = counts.get(key, 0) + 1
    return [PatchRecord(NAME, f"{cls}.forward", repl, count=n) for (cls, repl), n in sorted(counts.items())]
