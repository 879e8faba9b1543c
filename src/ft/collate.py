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


# Attention implementations that take sequence boundaries from position_ids / cu_seqlens
# (varlen kernels) instead of a mask.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


class PackedCollator:
    """Packed rows (several samples per row) -> inputs whose attention never crosses samples.

    Each row holds ``input_ids``, ``labels`` and ``position_ids`` that restart at 0 for every
    sample (rows without ``position_ids`` are one sample). Two ways to keep samples apart:

    - ``attention="mask"`` (eager, SDPA, CPU): rows are right-padded to the batch's longest
      row and a 4D additive float mask ``[B, 1, L, L]`` is sent: 0 where a token may attend
      (earlier tokens of its own sample), the dtype minimum elsewhere. Eager attention adds the
      mask to the scores, so it must be this additive float form (a boolean mask would be added
      as 0/1); SDPA accepts it as well. Padding forms a block of its own (so no row of the mask
      is fully masked, which would give NaN) and carries label -100. The mask is built in
      ``mask_dtype`` (the model's compute dtype; float32 by default). It costs B x L x L
      elements: for long sequences prefer a varlen attention.
    - ``attention="varlen"`` (flash attention): the whole batch is flattened into ONE row
      without padding and sent with ``position_ids`` and ``cu_seq_lens_q/k``, ``max_length_q/k``
      and NO ``attention_mask``: transformers derives the varlen boundaries only when no mask is
      passed (a mask of ones would silently let samples attend to each other), and only for a
      batch of one row.

    In both, the label at each sample's first position is set to -100: the model shifts labels
    by one, so that label would be predicted from the previous sample's last token. (Unpacked,
    a sample's first label is never a target either, so the loss is the same.)

    Bin order is not decided here: the Trainer's sampler reshuffles the rows (= bins) every
    epoch with the seed.
    """

    def __init__(self, pad_token_id: int, attention: str = "mask", pad_to_multiple_of: int | None = None,
                 mask_dtype: Any = None):
        if attention not in ("mask", "varlen"):
            raise ValueError(f"attention must be 'mask' or 'varlen', not {attention!r}")
        self.pad_token_id = pad_token_id
        self.attention = attention
        self.pad_to_multiple_of = pad_to_multiple_of
        # The model's compute dtype: SDPA kernels on GPU want the mask in the query's dtype.
        self.mask_dtype = mask_dtype

    @staticmethod
    def attention_for(attn_implementation: str | None) -> str:
        """'varlen' for flash-attention implementations (incl. hub kernels), else 'mask'."""
        name = (attn_implementation or "").lower()
        if name in VARLEN_ATTENTION or name.startswith("flash") or "flash-attn" in name or "flash_attn" in name:
            return "varlen"
        return "mask"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.attention == "varlen":
            return self._flattened(rows)
        return self._masked(rows)

    @staticmethod
    def _positions(row: dict[str, Any]) -> list[int]:
        pos = row.get("position_ids")
        return list(pos) if pos is not None else list(range(len(row["input_ids"])))

    def _masked(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        input_ids, labels, lengths = pad_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
        longest = input_ids.shape[1]
        # padding counts up from 0 as a sample of its own
        position_ids = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            k = int(lengths[i])
            position_ids[i, :k] = torch.as_tensor(self._positions(r), dtype=torch.long)
            position_ids[i, k:] = torch.arange(longest - k)
        starts = _sample_starts(position_ids)
        labels[starts] = IGNORE_INDEX
        sample = starts.long().cumsum(dim=1)  # which sample each token belongs to
        same = sample[:, :, None] == sample[:, None, :]
        causal = torch.ones((longest, longest), dtype=torch.bool).tril()
        allowed = (same & causal)[:, None, :, :]
        dtype = self.mask_dtype or torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}

    def _flattened(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        input_ids = torch.cat([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows])[None]
        labels = torch.cat([torch.as_tensor(r["labels"], dtype=torch.long) for r in rows])[None]
        position_ids = torch.cat([torch.as_tensor(self._positions(r), dtype=torch.long) for r in rows])[None]
        starts = _sample_starts(position_ids)
        labels[starts] = IGNORE_INDEX
        first = torch.nonzero(starts[0]).flatten()
        cu = torch.cat([first, torch.tensor([input_ids.shape[1]])]).to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        return {
            "input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
        }


def _sample_starts(position_ids: Any) -> Any:
    """True where a new sample starts: the first token, or where positions do not count up by one."""
    import torch

    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts
