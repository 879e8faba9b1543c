"""The ``reward_model`` training method: a Bradley-Terry reward model on preference pairs.

``method: reward_model`` loads the base as a sequence classifier with one output
(``AutoModelForSequenceClassification``, ``num_labels: 1``; the model scores a sequence at its last
non-padding token) and trains it on ``type: preference`` pairs so that the chosen side scores higher:

    loss = -log sigmoid(r(chosen) - r(rejected) - margin) + c * mean((r(chosen) + r(rejected))^2)

``margin`` is the pair's margin column (``datasets[].field_margin``, 0 without one) and ``c`` the
``reward_model.center_rewards_coefficient`` (TRL's name): a small c keeps the scores centred on 0.
The loss is the mean over the micro-batch's pairs, as TRL's RewardTrainer computes it (a test checks
loss and gradients against TRL 1.16 to 1e-5). Under ``-p lora`` the adapter trains the body and the
score head is trained in full (peft's SEQ_CLS task puts it in ``modules_to_save``).

The saved model (a full fine-tune) is a transformers sequence classifier: GRPO's ``reward_model``
reward loads it as it is. A LoRA run saves an adapter: ``ft merge OUTPUT_DIR`` writes the merged
classifier. See docs/reward-models.md.

torch is imported inside functions.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import EVAL, LOSS_WATCH, SEQUENCE_CLASSIFICATION, SHAPES_DATA, Method, Plugin

PLUGIN = Plugin()  # a method: chosen with `method: reward_model`

log = logging.getLogger("ft.reward_model")

NAME = "reward_model"
METRICS = ("accuracy", "margin", "mean_reward", "chosen_reward", "rejected_reward")


class RewardModelSection(BaseModel):
    """The ``reward_model:`` section."""

    model_config = ConfigDict(extra="forbid")

    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Weight of the centering term mean((r_chosen + r_rejected)^2), which keeps the scores "
        "near 0 (TRL's center_rewards_coefficient; 0.01 is usual). Unset: no centering.")
    max_prompt_len: int | None = Field(
        None, gt=0, json_schema_extra=SHAPES_DATA,
        description="Drop pairs whose prompt has more tokens than this (counted and reported).")


@hookimpl
def ft_add_config(registry):
    registry.add(NAME, RewardModelSection)


def collator(cfg: Any, tokenizer: Any) -> Any:
    from ft_plugins.preference_data import UnitCollator

    hf = cfg.section("hf")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return UnitCollator(pad, ("chosen", "rejected"), getattr(hf, "pad_to_multiple_of", None))


def bradley_terry(chosen: Any, rejected: Any, margin: Any = None, center: float | None = None) -> Any:
    """The reward model's loss on ``[U]`` chosen and rejected scores: the mean over pairs."""
    import torch

    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff)
    loss = -torch.nn.functional.logsigmoid(diff).mean()
    if center:
        loss = loss + center * torch.mean((chosen + rejected) ** 2)
    return loss


def trainer_class() -> type:
    import torch
    from transformers import Trainer

    class RewardModelTrainer(Trainer):
        """Bradley-Terry on pairs: a batch holds chosen 0, rejected 0, chosen 1, ... (``UnitCollator``)."""

        loss_is_scaled_for_ga = False  # the loss is a mean per micro-batch: the Trainer divides by the accumulation

        def __init__(self, *args: Any, reward_model: RewardModelSection, **kwargs: Any):
            self.reward_model = reward_model
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            rewards = out.logits.squeeze(-1).view(-1, 2)
            chosen, rejected = rewards[:, 0], rewards[:, 1]
            loss = bradley_terry(chosen, rejected, inputs.get("margin"), self.reward_model.center_rewards_coefficient)
            with torch.no_grad():
                self.ft_record({"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
                                "mean_reward": rewards.mean(), "chosen_reward": chosen.mean(),
                                "rejected_reward": rejected.mean()})
            return (loss, out) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return RewardModelTrainer


def trainer_kwargs(cfg: Any, model: Any, tokenizer: Any, data: Any) -> dict[str, Any]:
    return {"reward_model": cfg.section(NAME)}


@hookimpl
def ft_register_methods(register):
    from ft_plugins.preference_data import PAIR_COLUMNS

    register.add(Method(
        name=NAME, columns=PAIR_COLUMNS, collator=collator, trainer_class=trainer_class, trainer_kwargs=trainer_kwargs,
        metrics=METRICS, features=frozenset({EVAL, LOSS_WATCH}), head=SEQUENCE_CLASSIFICATION, num_labels=1,
        description="reward model: a sequence classifier trained with the Bradley-Terry loss on preference pairs",
    ))


@hookimpl
def ft_validate_config(cfg):
    if cfg.method != NAME:
        return None
    options = cfg.section(NAME)
    problems = []
    if options.max_prompt_len is not None and options.max_prompt_len >= cfg.sequence_len:
        problems.append(f"{cfg.where(NAME, 'max_prompt_len')}: max_prompt_len ({options.max_prompt_len}) must be below "
                        f"sequence_len ({cfg.sequence_len}); e.g. max_prompt_len: {cfg.sequence_len // 2}.")
    if cfg.train_on_inputs:
        problems.append(f"{cfg.where('train_on_inputs')}: a reward model scores whole sequences and has no labels to "
                        "train on; remove train_on_inputs.")
    return problems
