"""FSDP2: shard parameters, gradients and optimizer state across processes (``fully_shard``).

Select with ``plugins: [fsdp]`` and launch several processes (``ft run CONFIG --nproc N`` or
torchrun). Each decoder layer becomes one FSDP unit, the rest of the model the root unit.
Works with full fine-tuning, with LoRA (``-p lora``: the frozen base is sharded too) and with
QLoRA (``-p lora -p qlora``: the packed 4-bit base weights are sharded like any other, stored in
the compute dtype -- bitsandbytes' ``quant_storage`` -- so that mixed precision leaves them alone).

How it is applied: right before training (``ft_before_train``) the plugin calls torch's
``fully_shard`` on the model itself, on every device type. accelerate's FSDP support
(``fsdp``/``fsdp_config`` TrainingArguments) only exists for GPU setups -- on CPU the Trainer
would silently fall back to plain DDP -- and its argument format differs between transformers
5.17 and 5.24; applying FSDP2 directly runs the same code on CPU (tests, over gloo) and on GPUs.
The Trainer is told the model is already distributed, so accelerate does not wrap it in DDP.
Checkpoints (``save_steps``) hold the consolidated weights plus a sharded
torch.distributed.checkpoint of model and optimizer for resuming with the same process count.
The final weights are a consolidated state dict that ``from_pretrained`` loads (``save: full``)
or a sharded checkpoint (``save: sharded``; ``ft fsdp-consolidate DIR`` turns it into
safetensors).
"""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import FtError, Plugin

PLUGIN = Plugin(feature=True, provides=["sharding", "sharded_parameters"])  # one engine shards the model; every parameter, the frozen base too, is split across processes

log = logging.getLogger("ft.fsdp")

SHARDED_DIR = "fsdp_sharded"  # final weights with `save: sharded` (torch.distributed.checkpoint)
CHECKPOINT_STATE_DIR = "fsdp_state"  # model + optimizer shards inside each checkpoint-N, for resuming
SCHEDULER_FILE = "scheduler.pt"  # the Trainer's own name for it


class FsdpSection(BaseModel):
    """The ``fsdp:`` section."""

    model_config = ConfigDict(extra="forbid")

    reshard_after_forward: bool = Field(
        True, description="Free gathered parameters after each layer's forward (full sharding, least memory); "
        "false keeps them until backward (ZeRO-2 like: faster, more memory)."
    )
    wrap_layers: list[str] | None = Field(
        None, description="Module class names that become one FSDP unit each; default: the model's decoder layer "
        "classes (its `_no_split_modules`, e.g. LlamaDecoderLayer)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in backward (non-reentrant) to save memory."
    )
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Compute dtype; parameters and gradient reduction stay fp32. auto = bf16 when the run "
        "trains in bf16 (bf16: auto on a GPU that has it), else fp32."
    )
    offload_params: bool = Field(
        False, description="Keep sharded parameters, gradients and optimizer state in CPU memory (GPU only; slower)."
    )
    save: Literal["full", "sharded"] = Field(
        "full", description="Final weights: full = one consolidated state dict (from_pretrained loads it); sharded "
        "= each process writes its shards (for models too big to gather; `ft fsdp-consolidate` merges them)."
    )


def section(cfg: Any) -> FsdpSection:
    return cfg.section("fsdp")


@hookimpl
def ft_add_config(registry):
    registry.add("fsdp", FsdpSection)


@hookimpl
def ft_validate_config(cfg):
    fsdp = section(cfg)
    problems = []
    if len(cfg.providers("sharding")) > 1:
        problems.append(
            f"{cfg.where('plugins')}: {' and '.join(cfg.providers('sharding'))} are both selected, but a model is "
            "sharded by one engine only. Keep one of them (FSDP2: plugins: [fsdp]; DeepSpeed ZeRO: plugins: [deepspeed])."
        )
    if cfg.fp16:
        problems.append(
            f"{cfg.where('fp16')}: the fsdp plugin computes in bf16 or fp32, not fp16 (fp16 needs a sharded grad "
            "scaler). Use bf16 (bf16: true) or drop fp16."
        )
    if fsdp.save == "sharded" and cfg.provides("adapter"):
        problems.append(
            f"{cfg.where('fsdp', 'save')}: a LoRA adapter is small and is always saved whole; remove "
            "`save: sharded` (or train the full model)."
        )
    return problems


@hookimpl
def ft_add_commands(cli):
    import click

    @cli.command("fsdp-consolidate")
    @click.argument("output_dir", type=click.Path(file_okay=False, exists=True))
    def fsdp_consolidate(output_dir):
        """Merge the sharded weights an FSDP run saved (save: sharded) into model.safetensors."""
        path = consolidate(output_dir)
        click.echo(f"consolidated weights written to {path}")


# -- sharding --------------------------------------------------------------------------------


@hookimpl
def ft_before_train(cfg, trainer, model):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise FtError(
            "the fsdp plugin shards the model across processes, but this run has only one and no process group: "
            "launch it with `ft run CONFIG --nproc N` (or torchrun / accelerate launch)."
        )
    fsdp = section(cfg)
    shard_model(trainer.model, fsdp, _compute_dtype(cfg, fsdp), trainer.args.device)
    _patch_trainer(trainer, fsdp)


def decoder_layer_classes(model: Any, names: list[str] | None = None) -> set[type]:
    """The module classes that become one FSDP unit each (by class name)."""
    wanted = set(names or [])
    if not wanted:
        for module in model.modules():
            wanted.update(getattr(module, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not classes:
        raise FtError(
            f"fsdp.wrap_layers: no module of {type(model).__name__} is of class {', '.join(sorted(wanted)) or '(none given)'}; "
            "name the decoder layer class, e.g. fsdp: {wrap_layers: [LlamaDecoderLayer]}."
        )
    return classes


def shard_model(model: Any, fsdp: FsdpSection, compute_dtype: Any, device: Any) -> int:
    """Apply ``fully_shard`` to each decoder layer, then to the whole model. Mutates ``model``.

    Returns the number of FSDP units. Parameters become DTensors sharded on dim 0.
    """
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if fsdp.offload_params and device.type != "cuda":
        log.info("fsdp.offload_params: ignored without a GPU (the parameters are in CPU memory already)")
    offload = CPUOffloadPolicy() if fsdp.offload_params and device.type == "cuda" else OffloadPolicy()
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layer_classes = decoder_layer_classes(model, fsdp.wrap_layers)
    store_packed_weights_as(model, compute_dtype)
    if fsdp.activation_checkpointing:
        _enable_activation_checkpointing(model)
    kwargs = {"reshard_after_forward": fsdp.reshard_after_forward, "mp_policy": mp, "offload_policy": offload}
    layers = [m for m in model.modules() if type(m) in layer_classes]
    for layer in layers:
        _upcast_trainable(layer)  # one unit at a time, so a bf16-loaded model never doubles in full
        fully_shard(layer, **kwargs)
    _upcast_trainable(model)
    fully_shard(model, **kwargs)
    # accelerate must not also wrap the sharded model in DistributedDataParallel
    model._is_accelerate_prepared = True
    log.info("fsdp: sharded %d %s unit(s) + the root across %d processes (compute %s, reshard_after_forward %s)",
             len(layers), "/".join(sorted(c.__name__ for c in layer_classes)), torch.distributed.get_world_size(),
             str(compute_dtype).replace("torch.", ""), fsdp.reshard_after_forward)
    return len(layers) + 1


def store_packed_weights_as(model: Any, dtype: Any) -> int:
    """Give every packed 4-bit (bitsandbytes) weight the storage dtype FSDP2 gathers the shards in.

    FSDP2 splits each parameter on dim 0 and, with mixed precision, casts the gathered shards to the
    compute dtype. A 4-bit weight is packed bytes, shape (bytes / itemsize, 1): cast, its values
    would be destroyed; stored as the compute dtype (bitsandbytes' ``quant_storage``), the cast is a
    no-op. The qlora plugin loads it so already; a weight stored otherwise (uint8, a pre-quantized
    checkpoint, or qlora.compute_dtype unlike fsdp.mixed_precision) is reinterpreted here: the same
    bytes, viewed as ``dtype`` (bitsandbytes reads the bytes, whatever their dtype). Returns how many
    weights were reinterpreted.
    """
    import torch

    changed = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not getattr(weight, "bnb_quantized", False) or getattr(weight, "quant_state", None) is None:
            continue  # not a packed 4-bit weight (8-bit weights are refused by the qlora plugin)
        if weight.dtype == dtype:
            continue
        size = torch.empty(0, dtype=dtype).element_size()
        raw = weight.data.contiguous().view(torch.uint8).reshape(-1)
        if raw.numel() % size:
            raise FtError(
                f"fsdp: the 4-bit weight {name}.weight has {raw.numel()} bytes, which cannot be stored as "
                f"{str(dtype).replace('torch.', '')} for sharding; set qlora.compute_dtype and fsdp.mixed_precision "
                "to the same dtype (or leave both auto) so that the qlora plugin quantizes it in that storage."
            )
        weight.data = raw.view(dtype).reshape(-1, 1)
        weight.quant_storage = dtype
        module.quant_storage = dtype  # bitsandbytes rebuilds the weight with it when FSDP hands it a plain tensor
        changed += 1
    if changed:
        log.info("fsdp: %d packed 4-bit weight(s) reinterpreted as %s storage (the dtype the shards are gathered in)",
                 changed, str(dtype).replace("torch.", ""))
    return changed


def _enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing of each decoder layer (the form that composes with FSDP2)."""
    kwargs = {"use_reentrant": False}
    # transformers >= 5.2x names it activation checkpointing; older 5.x only has the old name
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False


def _upcast_trainable(module: Any) -> None:
    """fp32 master weights for what the optimizer updates; a frozen (LoRA) base keeps its dtype."""
    import torch

    for param in module.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def _compute_dtype(cfg: Any, fsdp: FsdpSection) -> Any:
    import torch

    from ft.api import resolve_precision

    if fsdp.mixed_precision == "auto":
        return torch.bfloat16 if resolve_precision(cfg) == "bf16" else torch.float32
    return torch.bfloat16 if fsdp.mixed_precision == "bf16" else torch.float32


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# -- saving and resuming -------------------------------------------------------------------------


def full_state_dict(model: Any) -> dict[str, Any]:
    """The consolidated state dict on CPU, on rank 0 (empty elsewhere). Collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _patch_trainer(trainer: Any, fsdp: FsdpSection) -> None:
    """Route the Trainer's saving and resuming through FSDP-aware versions (on this instance only).

    The Trainer does not know the model is sharded (accelerate's FSDP state is GPU-only), so its
    own checkpoint code would write one rank's shards. These replacements run on every rank.
    """
    trainer.ft_fsdp = fsdp

    def save_model(self, output_dir=None, _internal_call=False):
        output_dir = output_dir or self.args.output_dir
        if self.ft_fsdp.save == "sharded":
            if not _internal_call:  # the final weights; checkpoints keep their fsdp_state/ only
                save_sharded(self.model, output_dir, self.args.should_save)
            return
        state_dict = full_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)
        self.accelerator.wait_for_everyone()

    def save_optimizer_and_scheduler(self, output_dir):
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, _inner_optimizer(self.optimizer))
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(output_dir, CHECKPOINT_STATE_DIR))
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # The model's shards are restored together with the optimizer's, once the optimizer exists.
        if not Path(resume_from_checkpoint, CHECKPOINT_STATE_DIR).is_dir():
            raise FtError(
                f"cannot resume from {resume_from_checkpoint}: it has no {CHECKPOINT_STATE_DIR}/ (it was not written "
                "by an fsdp run). Resume it without -p fsdp, or start over with --fresh (which deletes the "
                "checkpoints in output_dir)."
            )

    def load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        optimizer = _inner_optimizer(self.optimizer)
        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        try:
            dcp.load(state, checkpoint_id=os.path.join(checkpoint, CHECKPOINT_STATE_DIR))
        except Exception as exc:  # e.g. another process count, or another model
            raise FtError(
                f"cannot resume from {checkpoint}: its sharded state does not fit this run ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Resume with the same model, plugins and process "
                "count, or start over with --fresh (which deletes the checkpoints in output_dir)."
            ) from exc
        set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        scheduler = Path(checkpoint, SCHEDULER_FILE)
        if self.lr_scheduler is not None and scheduler.is_file():
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))

    for name, fn in (
        ("save_model", save_model),
        ("_save_optimizer_and_scheduler", save_optimizer_and_scheduler),
        ("_load_from_checkpoint", load_from_checkpoint),
        ("_load_optimizer_and_scheduler", load_optimizer_and_scheduler),
    ):
        setattr(trainer, name, types.MethodType(fn, trainer))


def _inner_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


@hookimpl(wrapper=True)
def ft_save_weights(cfg, trainer, model, output_dir):
    """Let the adapter / plain savers write through the FSDP-aware ``trainer.save_model``.

    The lora and hf savers hand saving to ``trainer.save_model`` when the trainer says FSDP is on
    (they do so for accelerate's FSDP); that flag is set for the duration of the save only.
    """
    patched = getattr(trainer, "ft_fsdp", None) is not None and is_sharded(trainer.model)
    if not patched:
        return (yield)
    before = trainer.is_fsdp_enabled
    trainer.is_fsdp_enabled = True
    try:
        files = yield
    finally:
        trainer.is_fsdp_enabled = before
    if trainer.ft_fsdp.save == "sharded" and trainer.is_world_process_zero():
        files = [*(files or []), str(Path(output_dir) / SHARDED_DIR)]
    return files


def save_sharded(model: Any, output_dir: str, is_main: bool) -> str:
    """Each rank writes its own shards (torch.distributed.checkpoint) + the model config on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    target = Path(output_dir) / SHARDED_DIR
    dcp.save(get_model_state_dict(model), checkpoint_id=str(target))
    if is_main:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.save_pretrained(output_dir)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(output_dir)
        log.info("fsdp: sharded weights saved to %s; `ft fsdp-consolidate %s` merges them", target, output_dir)
    return str(target)


def consolidate(output_dir: str | os.PathLike) -> str:
    """Turn ``OUTPUT_DIR/fsdp_sharded`` into ``OUTPUT_DIR/model.safetensors`` (one process, CPU), the model
    rebuilt with the head its saved config names (a reward model's or PRM's classifier, else a causal LM)."""
    import tempfile

    import torch
    import transformers
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig

    from ft.api import AUTO_CLASSES, config_head

    out = Path(output_dir)
    sharded = out / SHARDED_DIR
    if not sharded.is_dir():
        raise FtError(f"{out} has no {SHARDED_DIR}/ to consolidate (it is written by an fsdp run with save: sharded).")
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(sharded), str(flat))
        state_dict = torch.load(flat, weights_only=True)
    config = AutoConfig.from_pretrained(out)
    auto = getattr(transformers, AUTO_CLASSES[config_head(config)])
    with torch.device("meta"):
        model = auto.from_config(config)
    model.load_state_dict(state_dict, assign=True, strict=True)
    model.save_pretrained(out, safe_serialization=True)
    return str(out / "model.safetensors")
