"""torch.compile of the model's forward (and so of its backward), where ft has verified it.

Selected with ``-p compile`` (options in the ``compile:`` section). The model's ``forward`` is
replaced on the instance by its compiled version, so the module, its parameter names and what
``save_pretrained`` writes stay the same, and the compiled forward is also what PEFT calls (it
calls ``model.forward`` directly, bypassing ``__call__``). Compilation happens lazily at the
first training step, after adapters are applied, so LoRA layers are compiled too.

Refused, because a combination was seen to go wrong or was never verified:
- together with ``liger`` (a trial with transformers 5.17 gave a loss of ~890 instead of ~12);
- modes that capture CUDA graphs (``reduce-overhead``, ``max-autotune``): training batches
  change shape, so graphs are re-recorded and memory grows.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import Plugin

PLUGIN = Plugin(feature=True, provides=["compiled_forward"])  # torch.compile traces the model's forward
NAME = "compile"  # the plugin's name: its config section and its patch records

log = logging.getLogger("ft.compile")

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class CompileOptions(BaseModel):
    """The ``compile:`` section: arguments of ``torch.compile``."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode. The CUDA-graph modes (reduce-overhead, max-autotune) are refused."
    )
    dynamic: bool | None = Field(
        None, description="Dynamic shapes: null = decide after the first shape change (torch's default); "
        "true = compile for varying lengths from the start; false = one graph per shape."
    )
    fullgraph: bool = Field(False, description="Fail instead of falling back to Python at graph breaks.")
    backend: str = Field("inductor", description="torch.compile backend (inductor; aot_eager to debug).")


def options(cfg: Any) -> CompileOptions:
    return cfg.section(NAME)


@hookimpl
def ft_add_config(registry):
    registry.add(NAME, CompileOptions)


@hookimpl
def ft_validate_config(cfg):
    problems = []
    if cfg.provides("fused_kernels"):
        problems.append(
            "plugins: compile together with liger is refused: the combination is not verified and one trial "
            "gave a loss of ~890 instead of ~12; deselect one of them (-p no:compile or -p no:liger)."
        )
    opts = options(cfg)
    if opts.mode in CUDA_GRAPH_MODES:
        problems.append(
            f"{cfg.where('compile', 'mode')}: mode '{opts.mode}' captures CUDA graphs, which ft has not verified "
            "for training (batches change shape, graphs are re-recorded); use default or "
            "max-autotune-no-cudagraphs."
        )
    return problems or None


@hookimpl(trylast=True)  # after the kernel plugins changed the modules it will trace
def ft_patch_model(cfg, model):
    import torch

    from ft.api import PatchRecord

    opts = options(cfg)
    original = model.forward
    model.forward = torch.compile(original, mode=opts.mode, dynamic=opts.dynamic, fullgraph=opts.fullgraph,
                                  backend=opts.backend)
    settings = f"mode={opts.mode}, dynamic={opts.dynamic}, fullgraph={opts.fullgraph}, backend={opts.backend}"
    return [PatchRecord(NAME, f"{type(model).__name__}.forward", f"torch.compile({settings})")]
