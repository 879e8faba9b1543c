"""What a tokenized sample's columns are (token ids, their labels, their sides) and the checks that drop a
sample whose sides are too long or identical where they must differ."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ft.kernel.formats import IGNORE_INDEX

NOTES = "notes"  # a sample's list of ft.kernel.formats.Note: counted in the data report, not a column


def is_token_column(name: str, *, positions: bool = False) -> bool:
    """Token columns hold a list of token ids per sample: ``input_ids``, ``labels`` and prefixed forms
    (``chosen_input_ids``, ``rejected_labels`` ...); their values are checked against the vocabulary and
    stored flat. Every other column is carried as it is, one value per sample.

    ``positions=True`` counts ``position_ids`` too: not token ids (never checked against the vocabulary),
    but one value per token as well, made by packing. Collators that join or pad the per-token columns
    of packed rows take it with them, never as a per-row value."""
    return name.endswith("input_ids") or is_labels_column(name) or (positions and name == "position_ids")


def is_labels_column(name: str) -> bool:
    """``labels`` and prefixed forms (``chosen_labels``): -100 where not trained."""
    return name == "labels" or name.endswith("_labels")


def labels_of(ids_column: str) -> str:
    """The labels column paired with a token-ids column (``chosen_input_ids`` -> ``chosen_labels``)."""
    return ids_column[: -len("input_ids")] + "labels"


def side_name(name: str) -> str:
    """What a token column holds, for messages: ``chosen`` for ``chosen_input_ids``, ``sample`` for ``input_ids``."""
    prefix = name[: -len("input_ids")].rstrip("_")
    return prefix or "sample"


def column_starts(columns: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Where each sample starts in each column's flat values."""
    out = {}
    for name, (_values, lengths) in columns.items():
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        out[name] = starts
    return out


def too_long_detail(columns: dict[str, tuple[np.ndarray, np.ndarray]], starts: dict[str, np.ndarray],
                     sequences: list[str], i: int, seq_len: int) -> str:
    """Which side of sample ``i`` is too long, and how its tokens split into prompt (up to the first
    trained label) and completion: "rejected 109 tokens (prompt 20 + completion 89) > sequence_len 48"."""
    parts = []
    for name in sequences:
        values, lengths = columns[name]
        n = int(lengths[i])
        if n <= seq_len:
            continue
        split = ""
        labels = columns.get(labels_of(name))
        if labels is not None:
            start = int(starts[labels_of(name)][i])
            trained = np.flatnonzero(labels[0][start:start + n] != IGNORE_INDEX)
            prompt = int(trained[0]) if len(trained) else n
            if 1 < prompt < n:
                split = f" (prompt {prompt} + completion {n - prompt})"
            elif prompt >= n:
                split = " (no trained token)"
        parts.append(f"{side_name(name)} {n} tokens{split}")
    return f"{', '.join(parts)} > sequence_len {seq_len}"


def drop_equal_sides(columns: dict[str, tuple[np.ndarray, np.ndarray]], sequences: list[str], long: np.ndarray,
                      keep: np.ndarray, rows_arr: np.ndarray, out: Any, seq_len: int) -> None:
    """Drop truncated samples whose sequences became identical (a pair whose chosen and rejected differ only
    past ``sequence_len``): reason "chosen equals rejected", named after the sides."""
    if len(sequences) < 2:
        return
    starts = column_starts(columns)
    for i in np.flatnonzero(long & keep):
        cut = {}
        for name in sequences:
            values, lengths = columns[name]
            start = int(starts[name][i])
            ids = values[start:start + int(lengths[i])]
            labels = columns.get(labels_of(name))
            lab = labels[0][start:start + int(lengths[i])] if labels is not None else None
            cut[name] = (ids, lab)
        for a, b in itertools.combinations(sequences, 2):
            (ids_a, lab_a), (ids_b, lab_b) = cut[a], cut[b]
            if np.array_equal(ids_a, ids_b) and (lab_a is None or np.array_equal(lab_a, lab_b)):
                out.drops.append((int(rows_arr[i]), f"{side_name(a)} equals {side_name(b)}",
                                  f"identical after truncation to sequence_len {seq_len} (excess_length: truncate): "
                                  "they differ only past it"))
                keep[i] = False
                break


SAME_SAMPLES = "samples of one row are identical"


def drop_equal_samples(columns: dict[str, tuple[np.ndarray, np.ndarray]], long: np.ndarray, keep: np.ndarray,
                        rows_arr: np.ndarray, out: Any, seq_len: int) -> None:
    """Drop a row whose samples truncation made identical (KTO's unpaired pair: the desirable and the
    undesirable completion differ only past ``sequence_len``, and would train against each other)."""
    rows, counts = np.unique(rows_arr, return_counts=True)
    if not (counts > 1).any():
        return
    candidates = set(rows_arr[long & keep].tolist()) & set(rows[counts > 1].tolist())
    if not candidates:
        return
    starts = column_starts(columns)
    by_row: dict[int, list[int]] = {}
    for i in np.flatnonzero(np.isin(rows_arr, list(candidates))).tolist():
        by_row.setdefault(int(rows_arr[i]), []).append(i)
    for row, samples in by_row.items():
        seen = set()
        for i in samples:
            key = tuple(values[starts[n][i]:starts[n][i] + lengths[i]].tobytes() for n, (values, lengths) in columns.items())
            if key in seen:
                out.drops.append((row, SAME_SAMPLES, f"identical after truncation to sequence_len {seq_len} "
                                                     "(excess_length: truncate): they differ only past it"))
                keep[samples] = False
                break
            seen.add(key)
