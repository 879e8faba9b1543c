"""Replace the model's RMSNorm modules with our own implementation (a kernel plugin template).

Copy this file, rename the plugin, and put your kernel in ``rms_norm``. What it shows:

- a *feature* plugin (``PLUGIN = Plugin(feature=True)``, its one declaration): it acts only when selected with
  ``-p kernel_example`` or ``plugins: [kernel_example]``;
- its own config section ``kernel_example:`` (a pydantic model: defaults, descriptions,
  unknown keys rejected);
- ``ft_patch_model`` patching the model INSTANCE it is handed (no library globals changed,
  so nothing needs undoing and two runs in one process never see each other's patches),
  checking each replacement against the original first, and returning one
  ``ft.kernel.patching.PatchRecord`` per replaced module (logged and saved with the run);
- swapping whole modules rather than binding ``forward`` on them: transformers' hub kernels
  re-kernelize ``LlamaRMSNorm`` and other hub-kernel layers at each ``train()``/``eval()``
  switch and drop a bound ``forward``, but leave a module of another class alone (ft checks
  after the first training step that every patch ran; ``ft.tools.testing.assert_patch_survives``
  is the same check for tests).

Torch is imported inside functions only: ``ft --help`` and ``ft plugins`` stay fast.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import FtError, PatchRecord, Plugin

PLUGIN = Plugin(feature=True)
NAME = "kernel_example"


class KernelExampleOptions(BaseModel):
    """The ``kernel_example:`` section."""

    model_config = ConfigDict(extra="forbid")

    module_suffix: str = Field(
        "RMSNorm", description="Replace modules whose class name ends with this (LlamaRMSNorm, Qwen2RMSNorm ...)."
    )
    compile: bool = Field(False, description="Run the replacement through torch.compile (first step is slower).")
    compile_backend: str = Field("inductor", description="torch.compile backend when compile is on.")
    verify: bool = Field(
        True,
        description="Before swapping, check each replacement against the original on a random input and "
        "refuse a module whose output differs (e.g. Gemma's 1 + weight norm).",
    )
    tolerance: float = Field(1e-5, gt=0, description="Largest absolute difference accepted by verify (float32).")


# -- the kernel ------------------------------------------------------------------------------


def rms_norm(hidden_states: Any, weight: Any, eps: float) -> Any:
    """y = weight * x / sqrt(mean(x^2) + eps), computed in float32, returned in x's dtype."""
    import torch

    dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _make_module_class() -> type:
    import torch

    class RMSNorm(torch.nn.Module):
        """Drop-in for a model's RMSNorm: shares the original ``weight`` parameter, so state-dict keys,
        optimizer state and checkpoints are unchanged."""

        def __init__(self, weight: torch.nn.Parameter, eps: float, fn: Any) -> None:
            super().__init__()
            self.weight = weight
            self.variance_epsilon = eps
            self._fn = fn

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self._fn(hidden_states, self.weight, self.variance_epsilon)

        def extra_repr(self) -> str:
            return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"

    RMSNorm.__module__ = __name__
    RMSNorm.__qualname__ = "RMSNorm"
    return RMSNorm


_CLASS_CACHE: dict[str, type] = {}


def replacement_class() -> type:
    if "RMSNorm" not in _CLASS_CACHE:
        _CLASS_CACHE["RMSNorm"] = _make_module_class()
    return _CLASS_CACHE["RMSNorm"]


# -- patching --------------------------------------------------------------------------------


def find_targets(model: Any, suffix: str) -> list[tuple[str, Any]]:
    """(qualified name, module) of every module whose class name ends with ``suffix``."""
    return [(name, module) for name, module in model.named_modules()
            if name and type(module).__name__.endswith(suffix)]


def _eps_of(name: str, module: Any) -> float:
    for attr in ("variance_epsilon", "eps"):
        if isinstance(getattr(module, attr, None), float):
            return getattr(module, attr)
    raise FtError(f"{NAME}: {name} ({type(module).__name__}) has no float `variance_epsilon` or `eps`; "
                  f"this kernel cannot replace it. Narrow `kernel_example.module_suffix`.")


def _verify(name: str, original: Any, new: Any, tolerance: float) -> None:
    import torch

    weight = new.weight
    probe = torch.randn(2, 3, weight.shape[-1], device=weight.device, dtype=torch.float32,
                        generator=torch.Generator(device=weight.device).manual_seed(0))
    with torch.no_grad():
        want, got = original(probe), new(probe)
    diff = (want.float() - got.float()).abs().max().item()
    if not diff <= tolerance:
        raise FtError(
            f"{NAME}: the replacement of {name} ({type(original).__name__}) differs from the original by {diff:.3g} "
            f"(tolerance {tolerance:g}); it computes something else, so it was not replaced. Exclude it with "
            f"`kernel_example.module_suffix`, or deselect the plugin."
        )


def patch_rms_norms(model: Any, options: KernelExampleOptions | None = None) -> list[PatchRecord]:
    """Replace matching modules on ``model`` in place; one record per replaced module."""
    options = options or KernelExampleOptions()
    fn = rms_norm
    if options.compile:
        import torch

        fn = torch.compile(rms_norm, backend=options.compile_backend, dynamic=True)
    cls = replacement_class()
    targets = find_targets(model, options.module_suffix)
    replacements = []
    for name, module in targets:  # build and check everything before changing anything
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 1:
            raise FtError(f"{NAME}: {name} ({type(module).__name__}) has no 1-D `weight`; this kernel cannot "
                          f"replace it. Narrow `kernel_example.module_suffix`.")
        new = cls(weight, _eps_of(name, module), fn)
        if options.verify:
            _verify(name, module, cls(weight, new.variance_epsilon, rms_norm), options.tolerance)
        replacements.append((name, module, new))
    records = []
    for name, module, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        how = "torch.compile" if options.compile else "eager"
        records.append(PatchRecord(NAME, f"{name} ({type(module).__name__})", f"{__name__}.RMSNorm ({how})"))
    return records


# -- hooks -----------------------------------------------------------------------------------


@hookimpl
def ft_add_config(registry):
    registry.add(NAME, KernelExampleOptions)


@hookimpl
def ft_patch_model(cfg, model):
    records = patch_rms_norms(model, cfg.section(NAME))
    if not records:
        suffix = (cfg.section(NAME)).module_suffix
        raise FtError(f"{NAME} is selected but {type(model).__name__} has no module whose class name ends with "
                      f"'{suffix}'. Set `kernel_example.module_suffix`, or drop `-p {NAME}`.")
    return records
