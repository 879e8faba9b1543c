"""The ``sft`` training method (the default): supervised fine-tuning on the trained labels.

Rows carry ``input_ids`` and ``labels`` (-100 = not trained), as every SFT format produces them
(chat_template, alpaca, completion, input_output ...). The loss is the model's own next-token
cross-entropy over trained labels; the collator right-pads each batch (labels and attention
mask by position, so whichever token pads, EOS stays trained). Packing and evaluation apply.

SFT registers itself through ``ft_register_methods`` exactly as a third-party method would.
"""

from __future__ import annotations

from typing import Any

from ft import hookimpl
from ft.api import EVAL, LOSS_WATCH, MODEL_LOSS, PACKING, SFT_COLUMNS, Method, Plugin

PLUGIN = Plugin(essential=True)  # essential: the default method is always available


def padding_collator(cfg: Any, tokenizer: Any) -> Any:
    from ft.api import PaddingCollator

    hf = cfg.section("hf")
    return PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=getattr(hf, "pad_to_multiple_of", None))


def trainer_class() -> type:
    from transformers import Trainer

    return Trainer


@hookimpl
def ft_register_methods(register):
    register.add(Method(
        name="sft",
        columns=SFT_COLUMNS,
        collator=padding_collator,
        trainer_class=trainer_class,
        features=frozenset({PACKING, EVAL, MODEL_LOSS, LOSS_WATCH}),
        description="supervised fine-tuning: next-token loss on the trained labels",
    ))
