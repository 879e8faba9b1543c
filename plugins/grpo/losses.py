"""GRPO's maths, checked against TRL's GRPOTrainer to 1e-5 (tests/plugins/test_grpo_trl.py): rewards combined and
normalised per group (advantages), importance-sampling weights, the clipped-surrogate loss.

torch is imported inside functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ft.api import FtError, target_logps


def nanstd(x: Any, dim: int | None = None, keepdim: bool = False) -> Any:
    """Unbiased standard deviation ignoring NaN (as TRL computes it)."""
    import torch

    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    std = var.sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


def combine_rewards(per_func: Any, none: Any, weights: Sequence[float]) -> tuple[Any, Any]:
    """``(rewards, bad)``: the weighted sum of each completion's rewards (``per_func`` ``[N, K]``; rewards that
    said None, ``none``, count 0; a completion every reward said None to is NaN, unscorable) and where a reward
    returned a non-finite value (NaN/inf: the loss then is NaN, and the health policy decides)."""
    import torch

    w = torch.as_tensor(list(weights), dtype=per_func.dtype, device=per_func.device)
    bad = ~torch.isfinite(per_func) & ~none
    rewards = torch.where(none, torch.zeros_like(per_func), per_func * w).sum(1)
    rewards[none.all(1)] = math.nan
    return rewards, bad


def group_advantages(rewards: Any, num_generations: int, scale: str, batch_std: Any = None) -> tuple[Any, Any]:
    """``(advantages, std)``: each completion's reward minus its group's mean, divided by the std of the group
    (``scale="group"``), of ``batch_std`` or the whole batch (``"batch"``), or not (``"none"``).

    ``rewards`` is ``[N]`` (N = groups x num_generations, groups consecutive); NaN marks an unscorable completion
    (every reward returned None): it is left out of its group's statistics and gets advantage 0.
    """
    import torch

    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale == "batch":
        std = (batch_std if batch_std is not None else nanstd(rewards)).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), std


def is_weights(old_logps: Any, sampling_logps: Any, mask: Any, mode: str, cap: float | None,
               floor: float | None) -> tuple[Any, dict[str, Any]]:
    """Importance-sampling weights that correct for completions sampled by another engine (or older weights):
    the ratio of the trainer's probability of each token (``old_logps``, no gradient) to the generator's
    (``sampling_logps``, NaN where it gave none: ratio 1), as TRL's ``vllm_importance_sampling_mode``:
    ``token_truncate`` clamps each token's ratio to ``[floor, cap]``; ``token_mask`` zeroes tokens outside it;
    ``sequence_*`` do the same with one ratio per completion (the product over its tokens), shape ``[B, 1]``.

    Returns the weights (multiplying each token's loss) and the statistics logged: ``is/mean``, ``is/min``,
    ``is/max`` of the weights over the completion tokens (over completions for sequence modes) and
    ``is/clipped``, the share of them truncated or masked.
    """
    import torch

    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    sequence = mode.startswith("sequence")
    raw = torch.exp(diff.sum(dim=-1, keepdim=True) if sequence else diff)
    low = floor if floor is not None else -math.inf
    high = cap if cap is not None else math.inf
    outside = (raw < low) | (raw > high)
    if mode.endswith("truncate"):
        weights = torch.clamp(raw, min=floor, max=cap)
    elif mode.endswith("mask"):
        weights = raw.masked_fill(outside, 0.0)
    else:
        raise FtError(f"unknown grpo.is_correction '{mode}'")
    with torch.no_grad():
        keep = torch.ones_like(weights, dtype=torch.bool) if sequence else mask.bool()
        flat, hit = weights[keep], outside[keep]
        empty = flat.new_zeros(())
        stats = {"is/mean": flat.mean() if flat.numel() else empty, "is/min": flat.min() if flat.numel() else empty,
                 "is/max": flat.max() if flat.numel() else empty,
                 "is/clipped": hit.float().mean() if hit.numel() else empty}
    return weights, stats


def policy_loss(logps: Any, old_logps: Any, ref_logps: Any, advantages: Any, mask: Any, *, loss_type: str,
                epsilon_low: float, epsilon_high: float, beta: float, max_completion_len: int,
                step_tokens: Any = None, importance: Any = None) -> tuple[Any, dict[str, Any]]:
    """The clipped-surrogate loss of one micro-batch, and its per-token statistics.

    ``logps``/``old_logps``/``ref_logps``/``mask`` are ``[B, C]`` (completion tokens), ``advantages`` ``[B]``.
    ``old_logps`` None means on-policy (ratio 1, gradient still flows); ``ref_logps`` is needed when ``beta > 0``.
    The loss is what one micro-batch contributes before the Trainer divides by the accumulation steps, so that
    the step's gradient is that of the objective over the whole step: ``step_tokens`` (dapo) is the number of
    completion tokens of the step over all devices, divided by the device count, times 1 / accumulation steps.
    ``importance`` (:func:`is_weights`) multiplies each token's surrogate loss, before the KL term, as in TRL.
    """
    import torch

    old = logps.detach() if old_logps is None else old_logps
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if importance is not None:
        per_token = per_token * importance
    stats: dict[str, Any] = {}
    if beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        stats["kl"] = kl.detach()
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_len)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / torch.as_tensor(step_tokens, dtype=per_token.dtype).clamp(min=1.0)
    else:
        raise FtError(f"unknown grpo.loss_type '{loss_type}'")
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        stats["clip_ratio"] = (low | high).to(per_token.dtype)
    return loss, stats


def masked_mean(values: Any, mask: Any) -> Any:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def completion_logps(logits: Any, completion_ids: Any, temperature: float, *, entropy: bool = False) -> tuple[Any, Any]:
    """Log-probabilities of the completion tokens under ``logits`` / temperature, and (optionally, without
    gradient) the entropy of each position's distribution. ``logits`` holds the positions that predict
    ``completion_ids`` (``[B, C, V]``)."""
    return target_logps(logits, completion_ids, temperature=temperature, entropy=entropy)


def forward_completion_logps(model: Any, batch: dict[str, Any], temperature: float, *, logits_to_keep: bool,
                             entropy: bool = False) -> tuple[Any, Any]:
    """:func:`completion_logps` of a micro-batch of :func:`~ft_plugins.grpo.batches.pack_rows` under ``model``
    (the policy, or an ``ft.api.ReferenceModel``), with logits computed only for the completion's positions
    where the model takes ``logits_to_keep``."""
    completion_ids = batch["completion_ids"]
    width = completion_ids.shape[1]
    extra = {"logits_to_keep": width + 1} if logits_to_keep else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False, **extra).logits
    return completion_logps(logits[:, -(width + 1):-1], completion_ids, temperature, entropy=entropy)
