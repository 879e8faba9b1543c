"""What preference and RL methods share: per-sequence log-probabilities and the reference policy.

- :func:`token_logps` / :func:`sequence_logps`: log-probabilities of the trained labels under a
  model's logits, with ft's label convention (labels are the inputs; the model predicts
  ``labels[t + 1]`` from position ``t``; -100 is not scored).
- :class:`ReferenceModel`: the frozen policy a method compares against (DPO, KTO, GRPO's KL).
  With an adapter (lora, qlora) it is the base with the adapter disabled -- no second copy in
  memory; in a full fine-tune it is a frozen copy made before training starts. ``plan`` says
  which, and the run logs it.

torch is imported inside functions: importing this module stays light.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

from ft.kernel.formats import IGNORE_INDEX

log = logging.getLogger("ft.reference")


def token_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """``(logps, mask)``: the log-probability of each next label, and where it is scored.

    ``logits`` is ``[B, L, V]`` and ``labels`` ``[B, L]`` (the inputs with -100 where not
    trained); both results are ``[B, L - 1]``: position ``t`` scores ``labels[:, t + 1]``.
    Computed in float32 with ``log_softmax`` then a gather (one ``[B, L, V]`` temporary).
    """
    import torch

    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    safe = torch.where(mask, target, torch.zeros_like(target))
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logprobs, 2, safe.unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_logps(logits: Any, labels: Any, *, average: bool = False) -> tuple[Any, Any]:
    """``(logps, counts)`` per sequence: the sum (or with ``average`` the mean) of the scored
    labels' log-probabilities, and how many labels were scored."""
    picked, mask = token_logps(logits, labels)
    counts = mask.sum(-1)
    total = picked.sum(-1)
    return (total / counts.clamp(min=1) if average else total), counts


def has_adapter(model: Any) -> bool:
    """Whether the model is a peft model whose adapter can be switched off."""
    inner = getattr(model, "module", model)  # DDP
    return hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config")


class ReferenceModel:
    """The frozen reference policy. Call :meth:`forward` with model inputs, under no_grad."""

    def __init__(self, model: Any, plan: str, copy_of_model: Any = None) -> None:
        self.policy = model
        self.plan = plan  # "adapter-disabled base" or "frozen copy"
        self.copy = copy_of_model

    @classmethod
    def for_training(cls, model: Any, what: str) -> ReferenceModel:
        """The reference for ``model``: its base with the adapter disabled, else a frozen copy."""
        if has_adapter(model):
            log.info("%s: reference model = the base model with the adapter disabled (no second copy in memory)", what)
            return cls(model, "adapter-disabled base")
        frozen = copy.deepcopy(model)
        frozen.eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        log.info("%s: reference model = a frozen copy of the initial model (%s parameters)", what,
                 f"{sum(p.numel() for p in frozen.parameters()):,}")
        return cls(model, "frozen copy", frozen)

    @contextlib.contextmanager
    def _active(self) -> Any:
        import torch

        with torch.no_grad():
            if self.copy is not None:
                yield self.copy
                return
            inner = getattr(self.policy, "module", self.policy)
            with inner.disable_adapter():
                yield self.policy

    def forward(self, **inputs: Any) -> Any:
        """The reference model's output for ``inputs`` (no gradients; dropout as the policy's mode)."""
        with self._active() as model:
            return model(**inputs)

    def to(self, device: Any) -> ReferenceModel:
        if self.copy is not None:
            self.copy.to(device)
        return self
