"""Dataset type `completion`: raw text (continued pre-training style).

Each document is tokenized, followed by the EOS token (preceded by BOS when the tokenizer has
one), and cut into pieces of at most ``sequence_len`` tokens, each piece its own sample with
every token trained. Chunking here (not in the data pipeline) means no text is lost to
``excess_length``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ft import hookimpl
from ft.api import DatasetOptions, Dropped, Plugin

PLUGIN = Plugin(essential=True)  # essential: always active


class CompletionOptions(DatasetOptions):
    """Dataset-entry options of ``type: completion``."""

    field: str = Field("text", description="Row field with the raw text.")


class CompletionTokenize:
    """Batched raw-text tokenization, chunked to ``sequence_len`` (picklable)."""

    def __init__(self, tokenizer: Any, options: CompletionOptions, *, sequence_len: int, where: str):
        from ft.api import FtError, TextEncoder

        if tokenizer.eos_token_id is None:
            raise FtError(f"{where}: the tokenizer has no eos_token, which ends each completion document; set "
                          "special_tokens: {eos_token: ...}.")
        self.encoder = TextEncoder(tokenizer)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        self.field = options.field
        self.sequence_len = sequence_len

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(rows)
        texts: list[str] = []
        kept: list[int] = []
        for r, row in enumerate(rows):
            text = row.get(self.field)
            if text is None:
                keys = ", ".join(sorted(map(str, row))) or "none"
                out[r] = Dropped(f"missing field '{self.field}'",
                                 f"row has fields: {keys}; set datasets[].field to the right one")
            elif not isinstance(text, str):
                out[r] = Dropped("malformed row", f"'{self.field}' is a {type(text).__name__}, not a string")
            elif not text.strip():
                out[r] = Dropped("empty", f"'{self.field}' has no text")
            else:
                texts.append(text)
                kept.append(r)
        n = self.sequence_len
        for r, ids in zip(kept, self.encoder.ids(texts), strict=True):
            ids = self.bos + ids + [self.eos]
            out[r] = [{"input_ids": ids[i:i + n], "labels": ids[i:i + n]} for i in range(0, len(ids), n)]
        return out


def build(cfg: Any, entry: CompletionOptions, tokenizer: Any) -> CompletionTokenize:
    from ft.api import entry_where

    return CompletionTokenize(tokenizer, entry, sequence_len=cfg.sequence_len, where=entry_where(cfg, entry))


@hookimpl
def ft_register_formats(register):
    register.add("completion", CompletionOptions, build)
