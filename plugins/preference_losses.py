"""The losses of the preference methods, as functions of per-sequence log-probabilities.

Every function takes 1-D tensors with one value per pair (or per row for KTO) and returns
``(losses, chosen_rewards, rejected_rewards)`` with one loss per pair/row; the caller averages.
The formulas are TRL 1.x's (tests/plugins/test_preference_trl.py checks each against TRL to 1e-5):

- DPO (Rafailov et al. 2023) with ``h = (logp_c - ref_c) - (logp_r - ref_r)``:
  sigmoid ``-log s(b h)`` (with ``label_smoothing`` e > 0 the conservative form
  ``-(1-e) log s(b h) - e log s(-b h)``), ipo ``(h' - 1/(2b))^2`` where ``h'`` uses per-token
  means, hinge ``relu(1 - b h)``, robust ``(-(1-e) log s(b h) + e log s(-b h)) / (1 - 2e)``.
- KTO (Ethayarajh et al. 2024): desirable ``w_d (1 - s(b (logratio - z)))``, undesirable
  ``w_u (1 - s(b (z - logratio)))``, with ``z`` the (detached, non-negative) KL estimate.
- ORPO (Hong et al. 2024): ``NLL - b log s(log odds(y_c) - log odds(y_r))`` on mean log-probs.
- SimPO (Meng et al. 2024): ``-log s(b (mean logp_c - mean logp_r) - g)`` (+ ``cpo_alpha`` NLL).

torch is imported inside functions.
"""

from __future__ import annotations

from typing import Any

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_losses(chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any, *, beta: float,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_counts: Any = None,
               rejected_counts: Any = None) -> tuple[Any, Any, Any]:
    """DPO and its variants. ``*_counts`` (scored tokens per sequence) are needed by ``ipo``."""
    import torch.nn.functional as F

    chosen_logratios = chosen - ref_chosen
    rejected_logratios = rejected - ref_rejected
    h = chosen_logratios - rejected_logratios
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
        if e:
            losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_counts is None or rejected_counts is None:
            raise ValueError("the ipo loss needs the scored-token counts of both sides")
        per_token = chosen_logratios / chosen_counts.clamp(min=1) - rejected_logratios / rejected_counts.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def kto_losses(logps: Any, ref_logps: Any, desirable: Any, kl: Any, *, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> tuple[Any, Any, Any]:
    """KTO: one loss per row; ``desirable`` is a boolean tensor, ``kl`` the batch's KL estimate.

    Rewards come back as ``(rewards, desirable mask)`` pieces: ``chosen_rewards`` holds the
    desirable rows' rewards, ``rejected_rewards`` the undesirable rows'.
    """
    import torch

    logratios = logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    rewards = beta * logratios.detach()
    return losses, rewards[desirable], rewards[~desirable]


def log1mexp(x: Any) -> Any:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2``."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(chosen_mean: Any, rejected_mean: Any, *, beta: float) -> tuple[Any, Any, Any, Any, Any]:
    """ORPO's odds-ratio term on per-token mean log-probs: ``(losses, chosen_rewards,
    rejected_rewards, log_odds_ratio, log_odds)``; the full loss adds the chosen NLL."""
    import torch.nn.functional as F

    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)
    return -beta * ratio, beta * chosen_mean.detach(), beta * rejected_mean.detach(), ratio.detach(), log_odds.detach()


def simpo_losses(chosen_mean: Any, rejected_mean: Any, *, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> tuple[Any, Any, Any]:
    """SimPO on per-token mean log-probs, margin ``gamma`` (TRL's CPO ``loss_type="simpo"``)."""
    import torch.nn.functional as F

    logits = (chosen_mean - rejected_mean) - gamma / beta
    e = label_smoothing
    losses = -F.logsigmoid(beta * logits) * (1 - e) - F.logsigmoid(-beta * logits) * e
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()
