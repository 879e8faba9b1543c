"""Training methods: what a run optimises (``method: sft``, ``dpo``, ``grpo`` ... in the config).

A method plugin registers a :class:`Method` in ``ft_register_methods``. The core reads nothing
but this declaration: which row columns the method's dataset formats must produce (checked at
validation, with file:line, before any model loads), how to build its collator, its Trainer and
arguments classes, the extra Trainer keyword arguments it needs (a reference model, reward
functions), the metrics it logs, and which features apply to it. SFT itself is the ``sft``
method plugin (``ft_plugins.sft``) and goes through exactly this path.

Metrics: a method's Trainer calls ``self.ft_record({name: value, ...})`` (from
``ft.engine.train.FtTrainerMixin``) once per micro-batch; the core averages them over each logging
window, adds them to the logged values, ``metrics.json`` and the training-curves plot. Names
listed in ``metrics`` are the ones a user can count on; names that depend on the config (one per
GRPO reward) are kept and plotted as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Features a method may support. A feature plugin that only makes sense for some methods says
# which of these it needs (``PLUGIN = Plugin(method_feature="packing")`` in its module).
PACKING = "packing"
EVAL = "eval"
# The loss is the model's own next-token cross-entropy over the labels (``model(..., labels=...)``),
# so a plugin may compute it another way (fused_loss) without changing the maths.
MODEL_LOSS = "model_loss"
# The health watch may judge the loss curve: it falls as the model learns, and a zero gradient means frozen
# weights. Not so for RL objectives (GRPO's loss hovers around 0; a step whose groups all got equal rewards
# has no gradient), whose methods leave it out.
LOSS_WATCH = "loss_watch"

SFT_COLUMNS = ("input_ids", "labels")

# The model head a method trains (``Method.head``): the hf loader builds the matching transformers class,
# the lora plugin the matching peft task (which trains a classification head in full).
CAUSAL_LM = "causal_lm"  # AutoModelForCausalLM: next-token logits
SEQUENCE_CLASSIFICATION = "sequence_classification"  # AutoModelForSequenceClassification: one score per sequence
TOKEN_CLASSIFICATION = "token_classification"  # AutoModelForTokenClassification: a score per token
HEADS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION)
AUTO_CLASSES = {CAUSAL_LM: "AutoModelForCausalLM", SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
                TOKEN_CLASSIFICATION: "AutoModelForTokenClassification"}  # the transformers class of each head


@dataclass(frozen=True)
class Method:
    """A training method, as its plugin declares it.

    Attributes:
        name: the ``method:`` value that selects it.
        columns: row columns every dataset format used with this method must produce
            (``input_ids``/``labels`` for SFT; ``chosen_input_ids``... for DPO).
        collator: ``(cfg, tokenizer) -> callable(list[row]) -> dict of tensors``; used unless a
            selected feature plugin (packing) supplies the collator through ``ft_collator``.
        trainer_class: ``() -> type``, a subclass of ``transformers.Trainer`` (imported lazily).
            The core mixes ft's checkpointing, token counting and metrics into it.
        arguments_class: ``() -> type``, a subclass of ``transformers.TrainingArguments``, or None
            for ``TrainingArguments``.
        trainer_kwargs: ``(cfg, model, tokenizer, data) -> dict`` of extra keyword arguments for
            the Trainer (a reference model, reward functions), or None.
        metrics: names of the metrics it logs through ``ft_record``, in plotting order.
        features: which features apply (``"packing"``, ``"eval"``, ``"model_loss"``, ``"loss_watch"``), none
            unless declared: each changes what the method's collator or loss sees (packed rows, eval batches),
            so a method opts in only to what it handles exactly. A selected plugin that needs one the method
            lacks (``-p packing``), or eval data for a method without ``"eval"``, is a config error. Plugins
            read them with ``cfg.method_supports(name)``.
        section: the config section holding the method's settings (default: the method's name);
            a section of a method that is not chosen is a config error.
        description: one line for ``ft plugins`` and the docs.
        head: the model head it trains, one of ``HEADS`` (default ``causal_lm``); a classification head
            (reward models) is loaded as ``AutoModelFor{Sequence,Token}Classification`` with ``num_labels``
            outputs, and under lora it is trained in full.
        num_labels: outputs of a classification head (1 for a reward model's score); None for ``causal_lm``.
    """

    name: str
    columns: tuple[str, ...]
    collator: Callable[..., Any]
    trainer_class: Callable[[], type]
    arguments_class: Callable[[], type] | None = None
    trainer_kwargs: Callable[..., dict[str, Any]] | None = None
    metrics: tuple[str, ...] = ()
    features: frozenset[str] = frozenset()  # opt-in: a feature changes the rows or the loss the method sees
    section: str | None = None
    description: str = ""
    head: str = CAUSAL_LM
    num_labels: int | None = None

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"method '{self.name}': head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if (self.head == CAUSAL_LM) != (self.num_labels is None):
            raise ValueError(f"method '{self.name}': num_labels goes with a classification head, and only with one")

    @property
    def section_name(self) -> str:
        return self.section or self.name

    def supports(self, feature: str) -> bool:
        return feature in self.features


def chosen_method(cfg: Any) -> Method | None:
    """The :class:`Method` the config chose (None before validation, or for an unknown name)."""
    registries = getattr(cfg, "registries", None)
    if registries is None or cfg.method not in registries.methods:
        return None
    return registries.methods.get(cfg.method).value


def model_head(cfg: Any) -> tuple[str, int | None]:
    """``(head, num_labels)`` of the chosen method (``("causal_lm", None)`` when unknown)."""
    method = chosen_method(cfg)
    return (method.head, method.num_labels) if method is not None else (CAUSAL_LM, None)
