"""Scoring shared by the methods that compare log-probabilities (preference, GRPO, ...).

- :func:`target_logps`: the log-probability of each target token under logits (float32, optionally at a
  temperature, with the entropy of each position). Every method's token log-probabilities come from it.
- :func:`token_logps` / :func:`sequence_logps`: the same with ft's label convention (labels are the inputs;
  position ``t`` predicts ``labels[t + 1]``; -100 is not scored), per token and summed per sequence.
- :class:`ReferenceModel`: the frozen policy a method compares against (DPO, KTO, GRPO's KL). With an
  adapter (lora, qlora) it is the base with the adapter disabled -- no second copy in memory; in a full
  fine-tune it is a frozen copy made before training starts. ``plan`` says which, and the run logs it. It
  is called like a model (no gradients), so one scoring function serves the policy and the reference.
- :func:`accumulation_share`: what one micro-batch's summed loss is divided by so that every item of an
  optimizer step (a token, a pair) weighs the same over the accumulation window and all processes.

torch is imported inside functions: importing this module stays light.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

from ft.kernel.formats import IGNORE_INDEX

log = logging.getLogger("ft.scoring")


# -- token log-probabilities --------------------------------------------------------------------------


def target_logps(logits: Any, targets: Any, *, temperature: float = 1.0, entropy: bool = False) -> tuple[Any, Any]:
    """``(logps, entropy)``: the log-probability of each target under ``logits`` / ``temperature`` and, with
    ``entropy``, the entropy of each position's distribution (without gradient; else None).

    ``logits`` is ``[..., V]`` and ``targets`` ``[...]``, aligned (``logits[i]`` predicts ``targets[i]``).
    Computed in float32 as the target's logit minus the log-sum-exp (no ``[..., V]`` log-softmax kept);
    targets equal to -100 (``IGNORE_INDEX``) get 0.
    """
    import torch

    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    mask = targets != IGNORE_INDEX
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits, dim=-1)
    logps = (logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse) * mask
    ent = None
    if entropy:
        with torch.no_grad():
            ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logps, ent


def token_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """``(logps, mask)``: the log-probability of each next label, and where it is scored.

    ``logits`` is ``[B, L, V]`` and ``labels`` ``[B, L]`` (the inputs with -100 where not
    trained); both results are ``[B, L - 1]``: position ``t`` scores ``labels[:, t + 1]``.
    """
    target = labels[:, 1:]
    return target_logps(logits[:, :-1], target)[0], target != IGNORE_INDEX


def sequence_logps(logits: Any, labels: Any, *, average: bool = False) -> tuple[Any, Any]:
    """``(logps, counts)`` per sequence: the sum (or with ``average`` the mean) of the scored
    labels' log-probabilities, and how many labels were scored."""
    picked, mask = token_logps(logits, labels)
    counts = mask.sum(-1)
    total = picked.sum(-1)
    return (total / counts.clamp(min=1) if average else total), counts


def output_layer(model: Any) -> Any:
    """The model's output projection (``get_output_embeddings``), through DDP/DeepSpeed/peft wrappers
    (and a :class:`ReferenceModel`); None when it has none."""
    inner = model
    for _ in range(4):
        inner = getattr(inner, "module", inner)
    get = getattr(inner, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


# -- the reference policy -----------------------------------------------------------------------------


def has_adapter(model: Any) -> bool:
    """Whether the model is a peft model whose adapter can be switched off."""
    inner = getattr(model, "module", model)  # DDP
    return hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config")


class ReferenceModel:
    """The frozen reference policy. Call it (or :meth:`forward`) with model inputs: no gradients."""

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

    __call__ = forward  # a scoring function takes the policy or the reference alike

    def get_output_embeddings(self) -> Any:
        """The output layer the reference's logits come from (what :func:`output_layer` finds)."""
        return output_layer(self.copy if self.copy is not None else self.policy)

    def to(self, device: Any) -> ReferenceModel:
        if self.copy is not None:
            self.copy.to(device)
        return self


# -- loss normalisation over gradient accumulation ------------------------------------------------------


def accumulation_share(trainer: Any, count: Any, micro_batches: int | None = None) -> Any:
    """The share of one micro-batch in an optimizer step's ``count`` (items: tokens, pairs ...): ``count``
    summed over all processes, divided by the number of processes and by the micro-batches of the
    accumulation window (``micro_batches``; default: the Trainer's current window).

    A method whose micro-batch loss is the sum of its items' losses divided by this share, with the
    Trainer dividing by the accumulation steps as usual (``loss_is_scaled_for_ga = False``), weighs
    every item of the step the same, whatever the number of items in each micro-batch and process
    (processes average gradients). ``count`` is this process's count over the whole window.
    """
    import torch

    args = trainer.args
    total = torch.as_tensor(count, dtype=torch.float32, device=args.device)
    if args.world_size > 1:
        total = trainer.accelerator.reduce(total, reduction="sum")
    if micro_batches is None:
        micro_batches = getattr(trainer, "current_gradient_accumulation_steps", None) or args.gradient_accumulation_steps
    return total / args.world_size / micro_batches
