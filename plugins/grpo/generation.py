"""Generation on the training model: a lean sampling loop over the model's forward and KV cache (with
Hugging Face ``generate`` as its fallback), parameters gathered while it runs under FSDP2 / ZeRO-3.

The ``vllm`` plugin replaces :class:`HFGeneration` with its own backend (``trainer.set_generation``).
torch is imported inside functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ft.api import FtError

log = logging.getLogger("ft.grpo")


class HFGeneration:
    """Colocated generation on the training model (Hugging Face transformers), all of a step's groups at once.

    By default a lean sampling loop over the model's forward and KV cache: each prompt is prefilled once
    and its cache shared by the group's completions, finished completions leave the batch, and tokens are
    drawn with an exponential race (exact categorical sampling, cheaper than ``torch.multinomial``),
    after temperature, top-k and top-p in Hugging Face's order. Models it does not fit (an exception on
    the first step, encoder-decoders) use ``model.generate`` instead, said once in the log.
    """

    name = "hf"

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.use_generate = False

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: dict[str, Any]) -> list[list[int]]:
        import ft_plugins.grpo as package
        import torch

        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        ids, mask = left_pad(prompt_ids, trainer.pad_token_id, trainer.args.device)
        was_training = model.training
        model.eval()  # no dropout, and the KV cache even with gradient checkpointing on
        gathered = full_parameters(trainer.model, trainer.accelerator)
        try:
            # inference_mode is cheaper than no_grad (only the token ids leave it, as Python lists); sharded
            # parameters, gathered outside it, must not be touched inside it
            with gathered, (torch.no_grad() if gathered.sharded else torch.inference_mode()):
                stops = trainer.eos_token_ids | frozenset(sampling.get("stop_token_ids") or ())
                loop_fits = not (sampling.get("min_p") or sampling.get("stop")
                                 or sampling.get("repetition_penalty", 1.0) != 1.0)  # what only generate does
                if loop_fits and not self.use_generate and not getattr(model.config, "is_encoder_decoder", False):
                    try:  # looked up on the package: a test (or plugin) may replace the loop there
                        return package.sample_groups(model, ids, mask, n, sampling, stops,
                                             logits_to_keep=trainer._logits_to_keep,
                                             check_stop=getattr(trainer, "ft_check_stop", None))
                    except FtError:  # a stop signal abandons the step
                        raise
                    except Exception as exc:  # noqa: BLE001 - a model the loop does not fit: generate instead
                        log.info("grpo: sampling with model.generate (the sampling loop does not fit this model: "
                                 "%s: %s)", type(exc).__name__, exc)
                        self.use_generate = True
                extra = {"stop_strings": list(sampling["stop"]), "tokenizer": trainer.processing_class} \
                    if sampling.get("stop") else {}
                out = model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=sampling["temperature"],
                    top_p=sampling["top_p"], top_k=sampling["top_k"], min_p=sampling.get("min_p"),
                    repetition_penalty=sampling.get("repetition_penalty", 1.0),
                    max_new_tokens=sampling["max_tokens"], num_return_sequences=n, pad_token_id=trainer.pad_token_id,
                    eos_token_id=sorted(stops), use_cache=True, disable_compile=True, **extra)
                completions = cut_at_eos(out[:, ids.shape[1]:].tolist(), stops)
                if extra and trainer.pad_token_id not in stops:  # stopped at a string: padded after it
                    completions = [_strip_trailing(c, trainer.pad_token_id) for c in completions]
                return completions
        finally:
            model.train(was_training)

    def sync_weights(self, model: Any) -> None:
        """Nothing to do: generation uses the training model itself."""


class full_parameters:  # noqa: N801 - used as a context manager
    """The full parameters on every process while it generates, then sharded again: FSDP2 units are unsharded
    and kept so between forwards (processes sample different numbers of tokens, so no collective may run
    inside); DeepSpeed ZeRO-3 parameters are gathered and its hooks lifted meanwhile (as TRL does). Nothing
    for an unsharded model (``sharded`` False)."""

    def __init__(self, model: Any, accelerator: Any):
        self.model = model
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # pragma: no cover - old torch
            FSDPModule = ()  # noqa: N806
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)] if FSDPModule else []
        self.zero3 = (getattr(accelerator, "state", None) is not None
                      and getattr(accelerator.state, "deepspeed_plugin", None) is not None
                      and accelerator.state.deepspeed_plugin.zero_stage == 3)
        self.sharded = bool(self.units) or self.zero3
        self._gather: Any = None

    def __enter__(self) -> full_parameters:
        if self.units:
            self._reshard = [m._get_fsdp_state()._fsdp_param_group is not None
                             and m._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
                             for m in self.units]
            for m in self.units:
                m.unshard()
                m.set_reshard_after_forward(False, recurse=False)
        elif self.zero3:
            import deepspeed

            self._gather = deepspeed.zero.GatheredParameters(list(self.model.parameters()))
            self._gather.__enter__()
            _zero3_hooks(self.model, remove=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.units:
            for m, reshard in zip(self.units, self._reshard, strict=True):
                m.set_reshard_after_forward(reshard, recurse=False)
                m.reshard()
        elif self._gather is not None:
            _zero3_hooks(self.model, remove=False)
            self._gather.__exit__(*exc)
            self._gather = None


def gathered_state(model: Any, accelerator: Any, keep: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The model's state dict (its own names, ``.module`` unwrapped) as full tensors on this process's CPU, also
    under FSDP2 (each DTensor gathered) and ZeRO-3 (the parameters gathered meanwhile); the shards stay as they
    are. ``keep(name)`` picks the entries, and only those are gathered (a LoRA adapter's, not the base's).
    Under sharding every process must call it at the same point: the gathers are collectives."""
    import contextlib

    import torch

    inner = getattr(model, "module", model)
    keep = keep or (lambda name: True)
    context: Any = contextlib.nullcontext()
    if full_parameters(model, accelerator).zero3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters([p for n, p in inner.named_parameters() if keep(n)])
    state = {}
    with context, torch.no_grad():
        for name, tensor in inner.state_dict().items():
            if keep(name):
                if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor)
                    tensor = tensor.full_tensor()
                state[name] = tensor.detach().to("cpu", copy=True)
    return state


def _zero3_hooks(engine: Any, remove: bool) -> None:
    """Lift (``remove``) or put back DeepSpeed ZeRO-3's parameter hooks (TRL's remove_hooks / add_hooks)."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return
    offload = getattr(optimizer, "parameter_offload", optimizer)
    if remove:
        for p in offload.module.parameters(recurse=True):
            getattr(p, "ds_active_sub_modules", set()).clear()
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
    else:
        coordinator = getattr(offload, "param_coordinator", None)
        if coordinator is not None and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        offload._register_deepspeed_module(offload.module)


def left_pad(prompt_ids: list[list[int]], pad: int, device: Any) -> tuple[Any, Any]:
    import torch

    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # left padding: every row continues at the same column
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: Any, temperature: float, top_k: int, top_p: float) -> Any:
    """Temperature, then top-k, then top-p (nucleus), as Hugging Face's sampling warpers do; removed
    tokens get -inf. ``logits`` is ``[B, V]`` float."""
    import torch

    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def sample_groups(model: Any, ids: Any, mask: Any, n: int, sampling: dict[str, Any], eos: frozenset[int],
                  logits_to_keep: bool = True, check_stop: Callable[[str], None] | None = None) -> list[list[int]]:
    """``n`` sampled completions per row of ``ids`` (left-padded prompts), prompt by prompt, each up to and
    including its first end token. Call under ``torch.inference_mode()``. ``check_stop(doing)`` is called
    before each token and may raise to abandon the step (a stop signal)."""
    import torch
    from transformers import DynamicCache

    rows = ids.shape[0] * n
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    keep = {"logits_to_keep": 1} if logits_to_keep else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                **keep)
    cache.batch_repeat_interleave(n)  # the prompt's cache, shared by its group: prefilled once
    logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
    mask = mask.repeat_interleave(n, dim=0)
    position = positions[:, -1].repeat_interleave(n, dim=0)
    alive = torch.arange(rows, device=ids.device)
    stops = torch.tensor(sorted(eos), device=ids.device)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    for step in range(sampling["max_tokens"]):
        if check_stop is not None:
            check_stop("generating completions")
        scores = filter_logits(logits, sampling["temperature"], sampling["top_k"], sampling["top_p"])
        probs = torch.softmax(scores, dim=-1)
        chosen = (probs / torch.empty_like(probs).exponential_()).argmax(-1)  # exact sampling from probs
        for row, token in zip(alive.tolist(), chosen.tolist(), strict=True):
            tokens[row].append(token)
        if step == sampling["max_tokens"] - 1:
            break
        going = ~torch.isin(chosen, stops)
        if not bool(going.all()):
            if not bool(going.any()):
                break
            index = going.nonzero().squeeze(1)
            cache.batch_select_indices(index)  # finished completions leave the batch
            alive, mask, position, chosen = alive[index], mask[index], position[index], chosen[index]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        position = position + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position[:, None],
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
    return tokens


def _strip_trailing(seq: list[int], pad: int) -> list[int]:
    end = len(seq)
    while end > 1 and seq[end - 1] == pad:
        end -= 1
    return seq[:end]


def cut_at_eos(sequences: list[list[int]], eos: frozenset[int]) -> list[list[int]]:
    """Each sequence up to and including its first end token (all of it when it has none)."""
    out = []
    for seq in sequences:
        end = next((i for i, t in enumerate(seq) if t in eos), None)
        out.append(seq if end is None else seq[: end + 1])
    return out

