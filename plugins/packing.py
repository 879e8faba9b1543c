"""Sample packing: several short samples per row, with attention that never crosses them.

Select it with ``plugins: [packing]`` (or ``-p packing``). After tokenization, samples are
packed offline into bins of ``sequence_len`` tokens by best-fit-decreasing (each sample, longest
first, goes into the fullest bin it still fits in; a segment tree over free space finds that
bin in O(log sequence_len), so packing is O(n log n) overall). The packed rows carry
``position_ids`` that restart at 0 for each sample, and the first label of each sample is -100.

Exactness (a packed batch gives the same per-token logits and loss as the samples one by one)
comes from ``ft.collate.PackedCollator``, which this plugin supplies as the collator: a
block-diagonal causal mask for eager/SDPA attention, and padding-free rows with
``position_ids`` and ``cu_seq_lens`` for flash-attention (varlen) implementations.

Bin order: bins are shuffled once with the seed here, and the Trainer's sampler reshuffles
rows (= bins) every epoch with the seed, so no epoch sees bins sorted by length.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from ft import hookimpl
from ft.errors import DataError

FT_FEATURE = True

log = logging.getLogger("ft.packing")


@hookimpl
def ft_pack(cfg, dataset):
    """Pack the tokenized training samples into bins of ``cfg.sequence_len`` tokens."""
    return pack_dataset(dataset, cfg.sequence_len, seed=cfg.seed)


@hookimpl
def ft_collator(cfg, tokenizer):
    """The packed collator (exact attention for the configured attention implementation)."""
    from ft.collate import PackedCollator

    hf = cfg.section("hf")  # the hf plugin's section (None only if the hf plugin is not loaded)
    attention = PackedCollator.attention_for(getattr(hf, "attn_implementation", None))
    if "varlen" in (cfg.plugins or []):  # the varlen plugin cuts sequences by position_ids: no mask needed
        attention = "varlen"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mask_dtype = None
    if attention == "mask":
        from ft.train import resolve_precision, torch_dtype

        mask_dtype = torch_dtype(resolve_precision(cfg))
        if cfg.sequence_len >= 8192:
            log.warning("packing with a %d x %d attention mask per row (attn_implementation %s); "
                        "flash_attention_2 or `-p varlen` avoids the mask", cfg.sequence_len, cfg.sequence_len,
                        getattr(hf, "attn_implementation", "sdpa"))
    return PackedCollator(pad_token_id=pad if pad is not None else 0, attention=attention,
                          pad_to_multiple_of=getattr(hf, "pad_to_multiple_of", None), mask_dtype=mask_dtype)


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

    from ft.data_tokenize import gather_ranges
    from ft.formats import IGNORE_INDEX

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


def packing_efficiency(dataset: Any, capacity: int) -> float:
    """Tokens / (bins x capacity) of a packed dataset."""
    import pyarrow.compute as pc

    col = dataset.with_format("arrow")[:].column("input_ids")
    total = sum(int(pc.sum(pc.list_value_length(chunk)).as_py() or 0) for chunk in col.chunks)
    return total / (len(dataset) * capacity) if len(dataset) else 1.0
