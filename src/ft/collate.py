"""Collators: rows of ``input_ids``/``labels`` -> padded tensors.

Labels are built before padding and padding is masked by *position* (``attention_mask`` and
label -100 beyond each row's length), so whichever token pads -- even eos -- the real EOS
tokens stay trained.
"""

from __future__ import annotations

from typing import Any

from ft.formats import IGNORE_INDEX


class PaddingCollator:
    """Right-pads each batch to its longest row (optionally to a multiple of ``pad_to_multiple_of``)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(rows)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            input_ids[i, :k] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(r["labels"], dtype=torch.long)
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
