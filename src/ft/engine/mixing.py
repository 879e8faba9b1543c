"""Mixing datasets by weight: each entry's share of the training rows, by largest remainder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def mix_by_weight(train: Any, parts: Sequence[Any], entries: Sequence[Any], seed: int,
                  shuffle: bool = True) -> tuple[Any, list[dict[str, Any]] | None]:
    """Give each training dataset its share of the training rows, by weight.

    ``train`` holds the training samples after the eval split; ``parts`` the samples of each entry
    of ``datasets`` (in order, to tell which rows came from which entry) and ``entries`` the
    entries themselves (``.weight``: None = 1; ``.path`` for the report). The number of training rows stays the same; entry *i* gets
    ``round(rows * w_i / sum(w))`` of them: a random subset of its rows when it has more, else every
    row once and a random rest repeated. A row's samples stay together, and copies of a row share
    its group, so no row is on both sides of an eval split. Returns ``(train, report)``; the report
    (one dict per entry: path, weight, rows available, rows used, share, repeats) is None when no
    entry has a weight.
    """
    import numpy as np

    weights = [getattr(e, "weight", None) for e in entries]
    if all(w is None for w in weights) or train.count == 0:
        return train, None
    rng = np.random.default_rng([seed, 0x6D6978])  # its own stream: the split and shuffle are unchanged
    groups = train.groups
    unique = np.unique(groups)
    owner = np.full(len(unique), -1, dtype=np.int64)  # which entry each training row came from
    for i, part in enumerate(parts):
        owner[np.isin(unique, np.unique(part.groups))] = i
    chosen: list[np.ndarray] = []
    report = []
    w = np.array([1.0 if x is None else float(x) for x in weights])
    available = [unique[owner == i] for i in range(len(parts))]
    total = sum(len(a) for a in available)
    targets = _largest_remainder(total * w / w.sum())
    for i, (rows, target) in enumerate(zip(available, targets, strict=True)):
        if len(rows) == 0:
            report.append({"path": entries[i].path, "weight": float(w[i]), "available": 0, "rows": 0, "share": 0.0, "repeats": 0.0})
            continue
        whole, rest = divmod(int(target), len(rows))
        picked = np.concatenate([np.tile(rows, whole), rng.choice(rows, size=rest, replace=False)])
        chosen.append(picked)
        report.append({"path": entries[i].path, "weight": float(w[i]), "available": int(len(rows)), "rows": int(len(picked)),
                       "share": round(len(picked) / max(total, 1), 6), "repeats": round(len(picked) / len(rows), 4)})
    picked_rows = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    if shuffle:
        picked_rows = picked_rows[rng.permutation(len(picked_rows))]
    # samples of each picked row, in the row's own order
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.searchsorted(sorted_groups, picked_rows, side="left")
    ends = np.searchsorted(sorted_groups, picked_rows, side="right")
    idx = np.concatenate([order[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]) \
        if len(picked_rows) else np.zeros(0, dtype=np.int64)
    return train.take(idx), report


def _largest_remainder(quotas: Any) -> list[int]:
    """Whole numbers that add up to round(sum(quotas)), each within 1 of its quota."""
    import numpy as np

    floor = np.floor(quotas).astype(np.int64)
    short = int(round(float(np.sum(quotas)))) - int(floor.sum())
    for i in np.argsort(-(quotas - floor), kind="stable")[:max(short, 0)]:
        floor[i] += 1
    return floor.tolist()
