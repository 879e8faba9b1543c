"""Dataset type `alpaca`: instruction / input / output rows with the standard Alpaca prompt.

The prompt (with or without input) is masked unless ``train_on_inputs``; the output and the
EOS token after it are trained; a BOS token starts the sample when the tokenizer has one.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ft import hookimpl
from ft.formats import IGNORE_INDEX, DatasetOptions, Dropped

FT_FEATURE = False  # essential: always active

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class AlpacaOptions(DatasetOptions):
    """Dataset-entry options of ``type: alpaca``."""

    field_instruction: str = Field("instruction", description="Row field with the instruction.")
    field_input: str = Field("input", description="Row field with the optional input (context).")
    field_output: str = Field("output", description="Row field with the response to train on.")


class AlpacaTokenize:
    """Batched Alpaca tokenization: one encoder call for all prompts and outputs (picklable)."""

    def __init__(self, tokenizer: Any, options: AlpacaOptions, *, train_on_inputs: bool, where: str):
        from ft.errors import FtError
        from ft.formats import TextEncoder

        if tokenizer.eos_token_id is None:
            raise FtError(f"{where}: the tokenizer has no eos_token, which alpaca samples end with; set "
                          "special_tokens: {eos_token: ...}.")
        self.encoder = TextEncoder(tokenizer)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        self.fields = (options.field_instruction, options.field_input, options.field_output)
        self.train_on_inputs = train_on_inputs

    def prompt(self, row: dict[str, Any]) -> tuple[str, str]:
        """(prompt, output) of a row; raises Dropped for bad rows."""
        f_ins, f_inp, f_out = self.fields
        instruction, inp, output = row.get(f_ins), row.get(f_inp), row.get(f_out)
        for name, value in ((f_ins, instruction), (f_out, output)):
            if value is None:
                keys = ", ".join(sorted(map(str, row))) or "none"
                raise Dropped(f"missing field '{name}'", f"row has fields: {keys}")
            if not isinstance(value, str):
                raise Dropped("malformed row", f"'{name}' is a {type(value).__name__}, not a string")
        if inp is not None and not isinstance(inp, str):
            raise Dropped("malformed row", f"'{f_inp}' is a {type(inp).__name__}, not a string")
        if not instruction.strip() and not output.strip():
            raise Dropped("empty", f"'{f_ins}' and '{f_out}' are empty")
        if inp and inp.strip():
            return PROMPT_WITH_INPUT.format(instruction=instruction, input=inp), output
        return PROMPT_NO_INPUT.format(instruction=instruction), output

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(rows)
        texts: list[str] = []
        kept: list[int] = []
        for r, row in enumerate(rows):
            try:
                prompt, output = self.prompt(row)
            except Dropped as dropped:
                out[r] = dropped
                continue
            texts += (prompt, output)
            kept.append(r)
        ids = self.encoder.ids(texts)
        for k, r in enumerate(kept):
            prompt_ids = self.bos + ids[2 * k]
            answer_ids = ids[2 * k + 1] + [self.eos]
            prompt_labels = list(prompt_ids) if self.train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
            if self.bos:
                prompt_labels[0] = IGNORE_INDEX  # BOS is never predicted
            out[r] = {"input_ids": prompt_ids + answer_ids, "labels": prompt_labels + answer_ids}
        return out


def build(cfg: Any, entry: AlpacaOptions, tokenizer: Any) -> AlpacaTokenize:
    from ft.formats import entry_where

    train_on_inputs = entry.train_on_inputs if entry.train_on_inputs is not None else cfg.train_on_inputs
    return AlpacaTokenize(tokenizer, entry, train_on_inputs=bool(train_on_inputs), where=entry_where(cfg, entry))


@hookimpl
def ft_register_formats(register):
    register.add("alpaca", AlpacaOptions, build)
