"""Dataset type `input_output`: pre-segmented text with a trained/untrained flag per segment.

A row is ``{"segments": [{"text": "...", "label": true|false}, ...]}``. Each segment is
tokenized on its own without added special tokens (write BOS/EOS into the text where you
want them) and the pieces are concatenated; tokens of ``label: true`` segments are trained.
With ``train_on_inputs`` every segment is trained.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ft import hookimpl
from ft.api import IGNORE_INDEX, DatasetOptions, Dropped, Plugin

PLUGIN = Plugin(essential=True)  # essential: always active


class InputOutputOptions(DatasetOptions):
    """Dataset-entry options of ``type: input_output``."""

    field_segments: str = Field("segments", description="Row field with the list of {text, label} segments.")


class InputOutputTokenize:
    """Batched segment tokenization: one encoder call for every segment of the batch (picklable)."""

    def __init__(self, tokenizer: Any, options: InputOutputOptions, *, train_on_inputs: bool):
        from ft.api import TextEncoder

        self.encoder = TextEncoder(tokenizer)
        self.field = options.field_segments
        self.train_on_inputs = train_on_inputs

    def segments(self, row: dict[str, Any]) -> list[tuple[str, bool]]:
        segs = row.get(self.field)
        if segs is None:
            keys = ", ".join(sorted(map(str, row))) or "none"
            raise Dropped(f"missing field '{self.field}'",
                          f"row has fields: {keys}; set datasets[].field_segments to the right one")
        if not isinstance(segs, (list, tuple)):
            raise Dropped("malformed segments", f"'{self.field}' is a {type(segs).__name__}, not a list")
        out = []
        for i, seg in enumerate(segs):
            if not isinstance(seg, dict):
                raise Dropped("malformed segments", f"segment {i} is a {type(seg).__name__}, not a mapping")
            text, label = seg.get("text"), seg.get("label")
            if not isinstance(text, str):
                raise Dropped("malformed segments", f"segment {i} has no string field 'text'")
            if not isinstance(label, bool):
                raise Dropped("malformed segments", f"segment {i}: 'label' must be true or false, got {label!r}")
            out.append((text, label))
        if not any(text for text, _ in out):
            raise Dropped("empty", f"'{self.field}' has no text")
        return out

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(rows)
        texts: list[str] = []
        kept: list[tuple[int, list[bool]]] = []
        for r, row in enumerate(rows):
            try:
                segs = self.segments(row)
            except Dropped as dropped:
                out[r] = dropped
                continue
            texts += [text for text, _ in segs]
            kept.append((r, [label for _, label in segs]))
        ids = self.encoder.ids(texts)
        k = 0
        for r, flags in kept:
            input_ids: list[int] = []
            labels: list[int] = []
            for trained in flags:
                piece = ids[k]
                k += 1
                input_ids += piece
                labels += piece if trained or self.train_on_inputs else [IGNORE_INDEX] * len(piece)
            out[r] = {"input_ids": input_ids, "labels": labels}
        return out


def build(cfg: Any, entry: InputOutputOptions, tokenizer: Any) -> InputOutputTokenize:
    train_on_inputs = entry.train_on_inputs if entry.train_on_inputs is not None else cfg.train_on_inputs
    return InputOutputTokenize(tokenizer, entry, train_on_inputs=bool(train_on_inputs))


@hookimpl
def ft_register_formats(register):
    register.add("input_output", InputOutputOptions, build)
