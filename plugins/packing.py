"""Sample packing: several short samples per row, with attention that never crosses them.

Select it with ``plugins: [packing]`` (or ``-p packing``). After tokenization, samples are
packed offline into bins of ``sequence_len`` tokens by best-fit-decreasing (each sample, longest
first, goes into the fullest bin it still fits in; a segment tree over free space finds that
bin in O(log sequence_len), so packing is O(n log n) overall). The packed rows carry
``position_ids`` that restart at 0 for each sample, and the first label of each sample is -100.

Exactness (a packed batch gives the same per-token logits and loss as the samples one by one)
comes from :class:`PackedCollator` below, which this plugin supplies as the collator: a
block-diagonal causal mask for eager/SDPA attention, and padding-free rows with
``position_ids`` and ``cu_seq_lens`` for flash-attention (varlen) implementations.

Bin order: bins are shuffled once with the seed here, and the Trainer's sampler reshuffles
rows (= bins) every epoch with the seed, so no epoch sees bins sorted by length.

Rows of several sequences (a preference pair: ``chosen_input_ids``/``chosen_labels`` and
``rejected_input_ids``/``rejected_labels``) are packed as *units*: a row's sequences go into one
bin together, one after the other in the order of the method's columns, each with its own
position restart, and a bin holds as many tokens as one unpacked row of the method could
(sequences x ``sequence_len``). The row's other columns (reference log-probabilities, say)
become one list per bin. The collator then also says where each sequence is (``sequence_ids``)
and returns those columns as one value per unit, so the method reads packed and unpacked batches
alike.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from ft import hookimpl
from ft.api import IGNORE_INDEX, DataError, Plugin

PLUGIN = Plugin(feature=True, provides=["packing"], method_feature="packing")  # only for methods that declare packing

log = logging.getLogger("ft.packing")


@hookimpl
def ft_pack(cfg, dataset, method):
    """Pack the tokenized training samples into bins of ``cfg.sequence_len`` tokens (units of
    several sequences into bins of sequences x ``sequence_len``)."""
    prefixes = method_sequences(method)
    if prefixes == ("",):
        return pack_dataset(dataset, cfg.sequence_len, seed=cfg.seed)
    return pack_units(dataset, prefixes, len(prefixes) * cfg.sequence_len, seed=cfg.seed)


@hookimpl
def ft_collator(cfg, tokenizer, method):
    """The packed collator (exact attention for the configured attention implementation)."""
    prefixes = method_sequences(method)
    hf = cfg.section("hf")  # the hf plugin's section (None only if the hf plugin is not loaded)
    attention = PackedCollator.attention_for(getattr(hf, "attn_implementation", None))
    if cfg.provides("varlen_attention"):  # an attention that cuts sequences at position_ids: no mask needed
        attention = "varlen"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mask_dtype = None
    if attention == "mask":
        from ft.api import resolve_precision, torch_dtype

        mask_dtype = torch_dtype(resolve_precision(cfg))
        if cfg.sequence_len >= 8192:
            log.warning("packing with a %d x %d attention mask per row (attn_implementation %s); "
                        "flash_attention_2 or `-p varlen` avoids the mask", cfg.sequence_len, cfg.sequence_len,
                        getattr(hf, "attn_implementation", "sdpa"))
    return PackedCollator(pad_token_id=pad if pad is not None else 0, attention=attention,
                          pad_to_multiple_of=getattr(hf, "pad_to_multiple_of", None), mask_dtype=mask_dtype,
                          sequences=None if prefixes == ("",) else prefixes)


def method_sequences(method: Any) -> tuple[str, ...]:
    """Column prefixes of the sequences in a method's rows: ``("",)`` for SFT's ``input_ids``/``labels``;
    ``("chosen_", "rejected_")`` for a preference pair, packed as units."""
    columns = tuple(method.columns)
    if columns == ("input_ids", "labels"):
        return ("",)
    prefixes = tuple(c[: -len("input_ids")] for c in columns if c.endswith("input_ids"))
    if not prefixes or "" in prefixes or any(f"{p}labels" not in columns for p in prefixes):
        raise DataError(f"method '{method.name}' declares packing, but its rows ({', '.join(columns)}) are neither "
                        "input_ids/labels nor named sequences (<name>_input_ids with <name>_labels), which this "
                        "packing plugin packs; the method must pack its rows itself (answer ft_pack and ft_collator "
                        "first) or not declare packing.")
    return prefixes


# -- the packed collator ------------------------------------------------------------------------


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

    With ``sequences`` (column prefixes, e.g. ``("chosen_", "rejected_")``) the rows are units of
    several sequences, packed (``pack_units``) or not (an evaluation row: its sequences are laid
    out one after the other here). The batch then also holds ``sequence_ids`` (``[B, L]``, or
    ``[1, N]`` flattened): the number of the sequence each token belongs to, counted over the
    batch in order (the ``k``-th sequence of unit ``u`` is ``u * len(sequences) + k``), -1 on
    padding; and every other column of the rows as a tensor with one value per unit.
    """

    def __init__(self, pad_token_id: int, attention: str = "mask", pad_to_multiple_of: int | None = None,
                 mask_dtype: Any = None, sequences: tuple[str, ...] | None = None):
        if attention not in ("mask", "varlen"):
            raise ValueError(f"attention must be 'mask' or 'varlen', not {attention!r}")
        self.pad_token_id = pad_token_id
        self.attention = attention
        self.pad_to_multiple_of = pad_to_multiple_of
        # The model's compute dtype: SDPA kernels on GPU want the mask in the query's dtype.
        self.mask_dtype = mask_dtype
        self.sequences = tuple(sequences) if sequences else None

    @staticmethod
    def attention_for(attn_implementation: str | None) -> str:
        """'varlen' for flash-attention implementations (incl. hub kernels), else 'mask'."""
        name = (attn_implementation or "").lower()
        if name in VARLEN_ATTENTION or name.startswith("flash") or "flash-attn" in name or "flash_attn" in name:
            return "varlen"
        return "mask"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.sequences is None:
            return self._flattened(rows) if self.attention == "varlen" else self._masked(rows)
        rows = [self._laid_out(r) for r in rows]
        batch = self._flattened(rows) if self.attention == "varlen" else self._masked(rows)
        batch["sequence_ids"] = _sequence_ids(batch["position_ids"], batch.pop("real", None))
        batch.update(_unit_values(rows))
        return batch

    def _laid_out(self, row: dict[str, Any]) -> dict[str, Any]:
        """An unpacked unit (an evaluation row) as a packed row of its sequences."""
        from ft.api import is_token_column

        if "input_ids" in row:
            return row
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for prefix in self.sequences or ():
            seq = list(row[f"{prefix}input_ids"])
            ids += seq
            labels += list(row[f"{prefix}labels"])
            positions += range(len(seq))
        out: dict[str, Any] = {"input_ids": ids, "labels": labels, "position_ids": positions}
        out.update({k: [v] for k, v in row.items() if not is_token_column(k, positions=True)})
        return out

    @staticmethod
    def _positions(row: dict[str, Any]) -> list[int]:
        pos = row.get("position_ids")
        return list(pos) if pos is not None else list(range(len(row["input_ids"])))

    def _masked(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from ft.api import pad_rows

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
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}
        if self.sequences is not None:  # where the real tokens are, for sequence_ids
            batch["real"] = torch.arange(longest)[None, :] < lengths[:, None]
        return batch

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


def _unit_values(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows' other columns (one list per packed row) as one tensor each, one value per unit."""
    import torch

    from ft.api import is_token_column

    return {name: torch.tensor([v for r in rows for v in r[name]]) for name in rows[0]
            if not is_token_column(name, positions=True)}


def _sequence_ids(position_ids: Any, real: Any = None) -> Any:
    """The number of each token's sequence over the whole batch (rows in order); -1 where ``real`` is False."""
    import torch

    starts = _sample_starts(position_ids)
    if real is None:  # flattened: one row, no padding
        return starts.long().cumsum(dim=1) - 1
    starts = starts & real
    counts = starts.sum(dim=1)
    offsets = torch.cumsum(counts, dim=0) - counts
    ids = starts.long().cumsum(dim=1) - 1 + offsets[:, None]
    return torch.where(real, ids, torch.full_like(ids, -1))


def _sample_starts(position_ids: Any) -> Any:
    """True where a new sample starts: the first token, or where positions do not count up by one."""
    import torch

    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


# -- best-fit-decreasing ------------------------------------------------------------------------


def pack_best_fit_decreasing(lengths: Any, capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity`` tokens (best-fit-decreasing).

    A segment tree over the free space of open bins (0..capacity) answers "the smallest free
    space >= length" in O(log capacity); bins with equal free space share a stack.
    """
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        i = int(lengths.argmax())
        raise DataError(f"sample {i} has {int(lengths[i])} tokens, more than the bin size {capacity}; "
                        "samples must be cut to sequence_len before packing (excess_length).")
    size = 1
    while size < capacity + 1:
        size *= 2
    tree = bytearray(2 * size)  # tree[node] = 1 if some open bin has a free space in the node's range
    by_space: list[list[int]] = [[] for _ in range(capacity + 1)]
    bins: list[list[int]] = []

    def set_flag(space: int, flag: int) -> None:
        node = space + size
        tree[node] = flag
        node >>= 1
        while node and tree[node] != (tree[2 * node] | tree[2 * node + 1]):
            tree[node] = tree[2 * node] | tree[2 * node + 1]
            node >>= 1

    def smallest_space_at_least(need: int) -> int:
        node = need + size
        if tree[node]:
            return need
        while node > 1:
            if not node & 1 and tree[node + 1]:  # a left child whose right sibling has open bins
                node += 1
                break
            node >>= 1
        else:
            return -1
        while node < size:
            node = 2 * node if tree[2 * node] else 2 * node + 1
        return node - size

    for idx in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[idx])
        space = smallest_space_at_least(n)
        if space < 0:
            b, left = len(bins), capacity - n
            bins.append([idx])
        else:
            stack = by_space[space]
            b = stack.pop()
            if not stack:
                set_flag(space, 0)
            bins[b].append(idx)
            left = space - n
        if left > 0:
            if not by_space[left]:
                set_flag(left, 1)
            by_space[left].append(b)
    return bins


def pack_dataset(dataset: Any, capacity: int, seed: int = 0) -> Any:
    """A ``datasets.Dataset`` of bins: ``input_ids``, ``labels``, ``position_ids`` per bin."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from ft.api import gather_ranges

    table = dataset.with_format("arrow")[:]
    ids_col = table.column("input_ids").combine_chunks()
    lab_col = table.column("labels").combine_chunks()
    lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    flat_ids = ids_col.flatten().to_numpy(zero_copy_only=False)
    flat_labels = lab_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])

    bins = pack_best_fit_decreasing(lengths, capacity)
    rng = np.random.default_rng(seed)
    bins = [bins[i] for i in rng.permutation(len(bins))]
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    sample_lengths = lengths[order]
    packed_starts = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(sample_lengths, out=packed_starts[1:])
    total = int(packed_starts[-1])
    ids = gather_ranges(flat_ids, starts[:-1][order], sample_lengths).astype(np.int32, copy=False)
    labels = gather_ranges(flat_labels, starts[:-1][order], sample_lengths)
    counting = np.arange(capacity, dtype=np.int32)  # positions restart at 0 for every sample
    positions = gather_ranges(counting, np.zeros(len(order), dtype=np.int64), sample_lengths)
    # The first token of a sample must not be the target of the previous sample's last token:
    # the model shifts labels by one, so label -100 at each sample's first position.
    labels[packed_starts[:-1][sample_lengths > 0]] = IGNORE_INDEX

    per_bin = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    bin_offsets = np.concatenate([[0], packed_starts[np.cumsum(per_bin)]]).astype(np.int64)
    offsets = pa.array(bin_offsets, type=pa.int64() if total >= 2**31 - 1 else pa.int32())
    make = pa.LargeListArray if total >= 2**31 - 1 else pa.ListArray
    packed = pa.table({
        "input_ids": make.from_arrays(offsets, pa.array(ids, type=pa.int32())),
        "labels": make.from_arrays(offsets, pa.array(labels, type=pa.int32())),
        "position_ids": make.from_arrays(offsets, pa.array(positions, type=pa.int32())),
    })
    efficiency = total / (len(bins) * capacity) if bins else 1.0
    lower_bound = -(-total // capacity)
    log.info("packed %d samples (%d tokens) into %d bins of %d tokens: efficiency %.2f%% (fewest possible bins: %d)",
             len(lengths), total, len(bins), capacity, 100 * efficiency, lower_bound)
    return Dataset(InMemoryTable(packed), fingerprint=f"ft-packed-{uuid.uuid4().hex}")


def pack_units(dataset: Any, prefixes: tuple[str, ...], capacity: int, seed: int = 0) -> Any:
    """A ``datasets.Dataset`` of bins of units: each row's sequences (``<prefix>input_ids`` /
    ``<prefix>labels`` for each prefix, in order) are laid one after the other in one bin, each
    with positions from 0 and its first label -100; the other columns become one list per bin."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from ft.api import gather_ranges

    table = dataset.with_format("arrow")[:]
    n_units, n_seq = table.num_rows, len(prefixes)
    flat_ids, flat_labels, starts, lengths = [], [], [], []
    base = 0
    for prefix in prefixes:  # every sequence column in one flat array; where each unit's sequence starts
        ids_col = table.column(f"{prefix}input_ids").combine_chunks()
        lab_col = table.column(f"{prefix}labels").combine_chunks()
        seq_lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.zeros(n_units + 1, dtype=np.int64)
        np.cumsum(seq_lengths, out=offsets[1:])
        flat_ids.append(ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False))
        flat_labels.append(lab_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False))
        starts.append(offsets[:-1] + base)
        lengths.append(seq_lengths)
        base += int(offsets[-1])
    all_ids, all_labels = np.concatenate(flat_ids), np.concatenate(flat_labels)
    seq_starts = np.stack(starts, axis=1)  # [unit, sequence]
    seq_lengths = np.stack(lengths, axis=1)

    bins = pack_best_fit_decreasing(seq_lengths.sum(axis=1), capacity)
    rng = np.random.default_rng(seed)
    bins = [bins[i] for i in rng.permutation(len(bins))]
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=n_units)
    sequence_lengths = seq_lengths[order].ravel()  # unit by unit, sequence by sequence
    ids = gather_ranges(all_ids, seq_starts[order].ravel(), sequence_lengths)
    labels = gather_ranges(all_labels, seq_starts[order].ravel(), sequence_lengths)
    packed_starts = np.zeros(len(sequence_lengths) + 1, dtype=np.int64)
    np.cumsum(sequence_lengths, out=packed_starts[1:])
    positions = gather_ranges(np.arange(capacity, dtype=np.int32), np.zeros(len(sequence_lengths), dtype=np.int64),
                              sequence_lengths)
    labels[packed_starts[:-1][sequence_lengths > 0]] = IGNORE_INDEX  # never predicted from the previous sequence

    per_bin = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    unit_offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum(per_bin, out=unit_offsets[1:])
    total = int(packed_starts[-1])
    large = total >= 2**31 - 1
    make = pa.LargeListArray if large else pa.ListArray
    offsets = pa.array(packed_starts[unit_offsets * n_seq], type=pa.int64() if large else pa.int32())
    columns = {
        "input_ids": make.from_arrays(offsets, pa.array(ids, type=pa.int32())),
        "labels": make.from_arrays(offsets, pa.array(labels, type=pa.int32())),
        "position_ids": make.from_arrays(offsets, pa.array(positions, type=pa.int32())),
    }
    token_columns = {f"{p}{c}" for p in prefixes for c in ("input_ids", "labels")}
    for name in table.column_names:
        if name not in token_columns:
            values = table.column(name).combine_chunks().take(pa.array(order))
            columns[name] = pa.ListArray.from_arrays(pa.array(unit_offsets, type=pa.int32()), values)
    packed = pa.table(columns)
    efficiency = total / (len(bins) * capacity) if bins else 1.0
    log.info("packed %d units of %d sequences (%d tokens) into %d bins of %d tokens: efficiency %.2f%% "
             "(fewest possible bins: %d)", n_units, n_seq, total, len(bins), capacity, 100 * efficiency,
             -(-total // capacity))
    return Dataset(InMemoryTable(packed), fingerprint=f"ft-packed-{uuid.uuid4().hex}")
