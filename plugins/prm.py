"""The ``prm`` training method: a process reward model that scores each reasoning step.

``method: prm`` loads the base as a token classifier with two outputs
(``AutoModelForTokenClassification``, ``num_labels: 2``: 0 = a bad step, 1 = a good one) and trains it
with cross-entropy at one token per step: the last token of the step separator that follows the step.
Every other token is labelled -100 and not scored. Under ``-p lora`` the classification head trains
in full (peft's TOKEN_CLS task).

Data: ``type: stepwise_supervised`` (axolotl's and TRL's format): rows
``{"prompt": text, "completions": [step, ...], "labels": [true/false or 1/0 per step]}``. The layout is
TRL's PRMTrainer's and axolotl's::

    [bos] prompt | step 1 + separator | step 2 + separator | ...
    labels: -100 ...  | -100 ... label 1  | -100 ... label 2  | ...

each piece tokenized on its own (``add_special_tokens=False``). ``step_separator`` (default a
newline) and ``train_on_last_step_only`` (only the last step's label is scored) are options of the
dataset entry. Rows with no steps, a label count that differs from the step count, or a label that is
not true/false/0/1 are dropped and counted with their ``file:line``.

At inference a step's score is ``softmax(logits)[1]`` at its separator's last token.

torch is imported inside functions.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ft import hookimpl
from ft.api import (
    EVAL,
    IGNORE_INDEX,
    LOSS_WATCH,
    TOKEN_CLASSIFICATION,
    DatasetOptions,
    Dropped,
    Method,
    Plugin,
)

PLUGIN = Plugin()  # a method: chosen with `method: prm`

NAME = "prm"
COLUMNS = ("prm_input_ids", "prm_labels")
METRICS = ("step_accuracy", "good_step_rate", "predicted_good_rate")
MALFORMED = "malformed row"


class StepwiseOptions(DatasetOptions):
    """Dataset-entry options of ``type: stepwise_supervised``."""

    field_prompt: str = Field("prompt", description="Row field with the prompt text.")
    field_completions: str = Field("completions", description="Row field with the list of steps (texts).")
    field_labels: str = Field("labels", description="Row field with one label per step: true/1 = a good step, "
                              "false/0 = a bad one.")
    step_separator: str = Field("\n", description="Text appended to every step; its last token carries the step's "
                                "label.")
    train_on_last_step_only: bool = Field(False, description="Score only the last step's label (the others are -100).")


def _label(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    return None


class StepwiseTokenize:
    """Rows -> ``prm_input_ids`` / ``prm_labels`` (batched, picklable)."""

    def __init__(self, tokenizer: Any, options: StepwiseOptions, where: str):
        from ft.api import FtError, TextEncoder

        self.encoder, self.options = TextEncoder(tokenizer), options
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.separator = self.encoder.ids([options.step_separator])[0] if options.step_separator else []
        if not self.separator:
            raise FtError(f"{where}.step_separator: the step separator gives no tokens, so a step's label has no "
                          "token to sit on; use a separator such as '\\n'.")

    def _split(self, row: dict[str, Any]) -> tuple[str, list[str], list[int]]:
        o = self.options
        prompt, steps, labels = row.get(o.field_prompt), row.get(o.field_completions), row.get(o.field_labels)
        if not isinstance(prompt, str):
            raise Dropped(MALFORMED, f"'{o.field_prompt}' must be a text, got {type(prompt).__name__}")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise Dropped(MALFORMED, f"'{o.field_completions}' must be a non-empty list of texts (the steps)")
        if not isinstance(labels, list) or len(labels) != len(steps):
            count = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise Dropped(MALFORMED, f"'{o.field_labels}' must hold one label per step ({len(steps)} steps, labels: "
                                     f"{count})")
        values = [_label(x) for x in labels]
        if None in values:
            bad = labels[values.index(None)]
            raise Dropped(MALFORMED, f"label {bad!r} in '{o.field_labels}' is not true/false or 1/0")
        return prompt, steps, values

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(rows)
        kept, texts = [], []
        for r, row in enumerate(rows):
            try:
                prompt, steps, labels = self._split(row)
            except Dropped as dropped:
                out[r] = dropped
                continue
            kept.append((r, len(steps), labels))
            texts.extend([prompt, *steps])
        encoded = iter(self.encoder.ids(texts))
        for r, n, labels in kept:
            ids = self.bos + next(encoded)
            targets = [IGNORE_INDEX] * len(ids)
            if self.options.train_on_last_step_only:
                labels = [IGNORE_INDEX] * (n - 1) + labels[-1:]
            for label in labels:
                step = next(encoded) + self.separator
                ids += step
                targets += [IGNORE_INDEX] * (len(step) - 1) + [label]
            out[r] = {"prm_input_ids": ids, "prm_labels": targets}
        return out


def build(cfg: Any, entry: StepwiseOptions, tokenizer: Any) -> StepwiseTokenize:
    from ft.api import entry_where

    return StepwiseTokenize(tokenizer, entry, entry_where(cfg, entry))


def collator(cfg: Any, tokenizer: Any) -> Any:
    hf = cfg.section("hf")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return StepCollator(pad, getattr(hf, "pad_to_multiple_of", None))


class StepCollator:
    """PRM rows -> ``input_ids``, ``labels`` (the step labels, -100 elsewhere and on padding), ``attention_mask``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from ft.api import pad_rows

        ids, labels, lengths = pad_rows([{"input_ids": r["prm_input_ids"], "labels": r["prm_labels"]} for r in rows],
                                        self.pad_token_id, self.pad_to_multiple_of)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def step_loss(logits: Any, labels: Any) -> tuple[Any, Any, Any]:
    """Cross-entropy over the labelled steps (mean), and the steps' targets and predictions."""
    import torch

    scored = labels != IGNORE_INDEX
    step_logits, targets = logits[scored].float(), labels[scored]
    return torch.nn.functional.cross_entropy(step_logits, targets), targets, step_logits.argmax(-1)


def trainer_class() -> type:
    import torch
    from transformers import Trainer

    class PrmTrainer(Trainer):
        """Token classification at the step separators."""

        loss_is_scaled_for_ga = False  # a mean per micro-batch: the Trainer divides by the accumulation steps

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            loss, targets, predicted = step_loss(out.logits, inputs["labels"])
            with torch.no_grad():
                self.ft_record({"step_accuracy": (predicted == targets).float().mean(),
                                "good_step_rate": targets.float().mean(),
                                "predicted_good_rate": predicted.float().mean()})
            return (loss, out) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return PrmTrainer


@hookimpl
def ft_register_formats(register):
    register.add("stepwise_supervised", StepwiseOptions, build, columns=COLUMNS)


@hookimpl
def ft_register_methods(register):
    register.add(Method(
        name=NAME, columns=COLUMNS, collator=collator, trainer_class=trainer_class, metrics=METRICS,
        features=frozenset({EVAL, LOSS_WATCH}), head=TOKEN_CLASSIFICATION, num_labels=2,
        description="process reward model: a token classifier scoring each reasoning step at its separator",
    ))
