"""The LM head and the cross-entropy fused, over the trained tokens only: no ``tokens x vocab`` logits.

Always active (block it with ``-p no:fused_loss``). Given labels, a transformers causal LM
computes the logits of EVERY position (prompt and padding included) in float32, and the
cross-entropy adds its log-softmax and, in the backward pass, two gradients of the same size:
at micro_batch_size 8 x 512 tokens and SmolLM2's 49k vocabulary, tensors of 0.8 GB, three of
them alive at the peak, mostly for positions that are not trained. TRL's SFTTrainer avoids
them by default (``loss_type="chunked_nll"``); so does this plugin, without TRL's recomputation.

How: the model instance's ``forward`` is replaced by one that, in training with labels, runs
the decoder as usual, picks the hidden states of the positions whose next token is trained
(labels shifted by one, -100 skipped), and computes the LM head and the cross-entropy over
them in chunks of about 16M logits (``LinearCrossEntropy``). Each chunk's gradient with
respect to the hidden states (and the head's weight when it is trained) is formed in the same
pass, so a chunk's logits are freed at once and the backward pass only scales what was kept.

Same maths as transformers' ``ForCausalLMLoss``: logits in the head's dtype, upcast to float32
for the loss; the sum of the token losses divided by ``num_items_in_batch`` (the Trainer's
count over all gradient-accumulation micro-batches) or else by the number of trained tokens.
The output carries the loss and no logits.

The model's own forward runs unchanged in evaluation, without labels, when hidden states,
attentions, a cache or a tuple are asked for, and when the head is not a plain ``Linear`` (LoRA
on ``lm_head``, ``modules_to_save``, a quantized head) or has forward hooks (they would not
run). Not applied at all (said in the log) to architectures outside ``SUPPORTED`` (logit
scaling, soft-capping and MoE auxiliary losses change the maths), when another plugin already
replaced ``forward`` (Liger's own fused cross-entropy), with ``compile`` (it traces forward),
and under fsdp / deepspeed, whose sharded weights a direct read of the head would miss.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ft import hookimpl
from ft.api import IGNORE_INDEX, MODEL_LOSS, Plugin

PLUGIN = Plugin()  # always active; `-p no:fused_loss` blocks it
NAME = "fused_loss"  # the plugin's name: its config section and its patch records

log = logging.getLogger("ft.fused_loss")

# model types whose ForCausalLM.forward is exactly: decoder -> lm_head -> ForCausalLMLoss
# (checked against transformers 5.24; granite, cohere, gemma2/3 scale or cap the logits).
SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "olmo", "olmo2", "smollm3",
                       "starcoder2", "stablelm"})
# sharding engines (fsdp, deepspeed) shard the head's weight; compile traces forward (it would trace this one too)
STEP_ASIDE_FOR = {"sharding": "a sharding engine shards the weights",
                  "compiled_forward": "compile traces the model's own forward"}

CHUNK_LOGITS = 1 << 24  # logits per chunk (64 MB in float32)


@hookimpl(trylast=True)
def ft_patch_model(cfg, model):
    from ft.api import PatchRecord

    reason = not_applicable(cfg, model)
    if reason:
        log.info("fused_loss: not applied: %s; the model computes its logits and loss itself", reason)
        return []
    model.forward = fused_forward(model, model.forward)
    return [PatchRecord(NAME, f"{type(model).__name__}.forward",
                        "LM head + cross-entropy fused over trained tokens (training with labels)")]


def not_applicable(cfg: Any, model: Any) -> str | None:
    """Why the fused loss cannot replace this model's forward, or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not cfg.method_supports(MODEL_LOSS):
        return f"method '{cfg.method}' computes its own loss (it does not declare '{MODEL_LOSS}')"
    for capability, reason in STEP_ASIDE_FOR.items():
        if cfg.provides(capability):
            return reason
    if "forward" in vars(model):
        return f"another plugin replaced {type(model).__name__}.forward"
    if model_type not in SUPPORTED:
        return f"model type '{model_type}' is not one whose loss it reproduces ({', '.join(sorted(SUPPORTED))})"
    forward_module = getattr(type(model).forward, "__module__", "") or ""
    if not forward_module.startswith("transformers."):
        return f"{type(model).__name__}.forward comes from {forward_module}, not transformers"
    if getattr(config, "loss_type", None) not in (None, "ForCausalLM"):
        return f"the model's loss_type is {config.loss_type}"
    if getattr(config, "output_router_logits", False):
        return "the model adds a router auxiliary loss"
    return None


def fused_forward(model: Any, original: Any) -> Any:
    """``model.forward`` that fuses head and loss in training with labels, else calls ``original``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    backbone = getattr(model, model.base_model_prefix)

    def forward(*args: Any, **kwargs: Any) -> Any:
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        head = model.get_output_embeddings()
        if (args or not model.training or (labels is None and shift_labels is None) or not plain_linear(head)
                or kwargs.get("return_dict") is False or kwargs.get("use_cache")
                or any(kwargs.get(k) for k in ("output_hidden_states", "output_attentions", "logits_to_keep"))
                or any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))):
            return original(*args, **kwargs)
        inputs = {k: v for k, v in kwargs.items() if k not in (
            "labels", "shift_labels", "num_items_in_batch", "use_cache", "logits_to_keep", "return_dict",
            "output_hidden_states", "output_attentions", "cache", "past_key_values")}
        hidden = backbone(**inputs, use_cache=False)[0]  # last_hidden_state (also when it returns a tuple)
        loss = causal_lm_loss(hidden, head.weight, head.bias, labels=labels, shift_labels=shift_labels,
                              num_items_in_batch=kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss, logits=None)

    forward.__wrapped__ = original  # what it replaced, for readers and debuggers
    return forward


def plain_linear(module: Any) -> bool:
    """A ``torch.nn.Linear`` whose forward nobody hooks or replaced (a kernel plugin may bind one on the
    instance): reading its weight computes what calling it would."""
    import torch
    from torch.nn.modules import module as torch_module

    return (type(module) is torch.nn.Linear and "forward" not in vars(module)
            and not module._forward_hooks and not module._forward_pre_hooks
            and not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks)


def causal_lm_loss(hidden: Any, weight: Any, bias: Any = None, *, labels: Any = None, shift_labels: Any = None,
                   num_items_in_batch: Any = None) -> Any:
    """``ForCausalLMLoss(lm_head(hidden), labels)`` without the logits of untrained positions.

    ``hidden`` is ``[batch, seq, hidden]``; position ``i`` predicts ``labels[:, i + 1]`` (or
    ``shift_labels[:, i]``); -100 is not trained.
    """
    import torch

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = targets.index_select(0, keep)
    if num_items_in_batch is None:
        denominator = torch.tensor(float(keep.numel()), device=hidden.device)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    return linear_cross_entropy_function().apply(picked, weight, bias, targets, denominator)


@functools.cache
def linear_cross_entropy_function() -> type:
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """``cross_entropy(hidden @ weight.T + bias, targets, reduction="sum") / denominator``, in chunks.

        The forward pass computes each chunk's logits, its loss, and at once the gradient of the
        loss with respect to ``hidden``, ``weight`` and ``bias`` (those that need one); the chunk's
        logits are then dropped. The backward pass scales the kept gradients by the incoming one.
        """

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, denominator):
            rows = max(1, CHUNK_LOGITS // weight.shape[0])
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            grad_h = torch.empty_like(hidden) if need_h else None
            # accumulate the head's gradient over chunks in float32, like one matmul would
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                h, t = hidden[start:start + rows], targets[start:start + rows]
                logits = h @ weight.t()
                if bias is not None:
                    logits = logits + bias
                logits = logits.float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad = grad.to(h.dtype)
                if need_h:
                    grad_h[start:start + rows] = grad @ weight
                if need_w and h.dtype == torch.float32:
                    grad_w.addmm_(grad.t(), h)
                elif need_w:
                    grad_w += (grad.t() @ h).float()
                if need_b:
                    grad_b += grad.float().sum(0)
            if need_h:
                grad_h.div_(denominator.to(grad_h.dtype))
            if need_w:
                grad_w = grad_w.div_(denominator).to(weight.dtype)
            if need_b:
                grad_b = grad_b.div_(denominator).to(bias.dtype)
            ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
            ctx.needs = (need_h, need_w, need_b)
            return total / denominator

        @staticmethod
        def backward(ctx, grad_output):
            saved = list(ctx.saved_tensors)
            grads = [saved.pop(0) if need else None for need in ctx.needs]
            if grad_output.ne(1.0).item():  # the Trainer's loss scaling (fp16, accumulation without num_items)
                grads = [g * grad_output.to(g.dtype) if g is not None else None for g in grads]
            return grads[0], grads[1], grads[2], None, None

    return LinearCrossEntropy
