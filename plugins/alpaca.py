"""Dataset type `alpaca`: instruction / input / output rows with the standard Alpaca prompt.

The prompt (with or without input) is masked unless ``train_on_inputs``; the output and the
EOS token after it are trained; a BOS token starts the sample when the tokenizer has one.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ft import hookimpl
from ft.api import DatasetOptions, Dropped, Plugin, PromptCompletion

PLUGIN = Plugin(essential=True)  # essential: always active

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


class AlpacaTokenize(PromptCompletion):
    """The Alpaca prompt around instruction (and input); the output is the completion."""

    def prompt_and_completion(self, row: dict[str, Any]) -> tuple[str, str]:
        entry = self.entry
        instruction, output = self.text(row, entry.field_instruction), self.text(row, entry.field_output)
        inp = self.text(row, entry.field_input, required=False)
        if not instruction.strip() and not output.strip():
            raise Dropped("empty", f"'{entry.field_instruction}' and '{entry.field_output}' are empty")
        if inp.strip():
            return PROMPT_WITH_INPUT.format(instruction=instruction, input=inp), output
        return PROMPT_NO_INPUT.format(instruction=instruction), output


@hookimpl
def ft_register_formats(register):
    register.add("alpaca", AlpacaOptions, AlpacaTokenize.build)
