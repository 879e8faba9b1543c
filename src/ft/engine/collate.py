"""Collators: rows of ``input_ids``/``labels`` -> padded tensors.

Labels are built before padding and padding is masked by *position* (``attention_mask`` and
label -100 beyond each row's length), so whichever token pads -- even eos -- the real EOS
tokens stay trained.
"""

from __future__ import annotations

from typing import Any

from ft.kernel.formats import IGNORE_INDEX


class PaddingCollator:
    """Right-pads each batch to its longest row (optionally to a multiple of ``pad_to_multiple_of``)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        input_ids, labels, lengths = pad_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pad_rows(rows: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None) -> tuple:
    """Right-pad ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100) to the longest row.

    Returns ``(input_ids, labels, lengths)`` as tensors; padding is told apart by position only.
    """
    import torch

    lengths = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long)
    longest = int(lengths.max())
    if pad_to_multiple_of:
        longest = (longest + pad_to_multiple_of - 1) // pad_to_multiple_of * pad_to_multiple_of
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        input_ids[i, :k] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.as_tensor(r["labels"], dtype=torch.long)
    return input_ids, labels, lengths
