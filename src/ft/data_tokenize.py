"""Parallel, batched tokenization of raw rows into flat token arrays.

Why not ``datasets.map(num_proc=...)``: it pickles the function and every batch through
Arrow files in a cache directory of its own, and a failing row takes the whole map down.
Here a pool of forked workers (the rows and the format's ``Tokenize`` are inherited, nothing
is pickled on the way in) tokenizes chunks of rows and sends back compact numpy arrays (flat
token ids, labels, sample lengths), which become Arrow columns without a Python-level copy.
Each worker also applies ``excess_length`` and the "nothing to train" rule with numpy, so the
parent only concatenates. Where ``fork`` is unavailable (macOS, Windows) the ``Tokenize`` is
pickled once per worker (formats keep them picklable) and rows travel with each chunk.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ft.errors import DataError, FtError
from ft.formats import IGNORE_INDEX, Drop, Dropped

# Reasons (kept in sync with ft.data, which re-exports them).
EMPTY = "empty"
TOO_LONG = "longer than sequence_len"
NOTHING_TO_TRAIN = "nothing to train"

INLINE_BELOW_ROWS = 2000  # fewer rows than this: forking workers costs more than it saves


@dataclass
class Samples:
    """Tokenized samples as flat arrays: sample ``i`` is ``ids[offsets[i]:offsets[i+1]]``.

    ``groups`` holds a number per sample that is unique per source row (samples from one row
    share it), so shuffling and eval splits keep a row's samples together.
    """

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    groups: np.ndarray

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def empty(cls) -> Samples:
        z = np.zeros(0, dtype=np.int32)
        return cls(z, z.copy(), np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64))

    @classmethod
    def concat(cls, parts: Sequence[Samples]) -> Samples:
        parts = [p for p in parts if p.count]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        offsets = [parts[0].offsets]
        base = parts[0].offsets[-1]
        for p in parts[1:]:
            offsets.append(p.offsets[1:] + base)
            base += p.offsets[-1]
        return cls(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate(offsets),
            np.concatenate([p.groups for p in parts]),
        )

    def take(self, idx: np.ndarray) -> Samples:
        """Samples ``idx`` in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.offsets[:-1][idx]
        return Samples(gather_ranges(self.ids, starts, lengths), gather_ranges(self.labels, starts, lengths),
                       offsets, self.groups[idx])

    def trained_tokens(self) -> int:
        """Labels that are trained (the first label of a sample is never a target: labels shift)."""
        trained = self.labels != IGNORE_INDEX
        starts = self.offsets[:-1][self.lengths > 0]
        return int(trained.sum() - trained[starts].sum())

    def to_table(self) -> Any:
        import pyarrow as pa

        large = self.offsets[-1] >= 2**31 - 1
        offsets = pa.array(self.offsets, type=pa.int64() if large else pa.int32())
        make = pa.LargeListArray if large else pa.ListArray
        return pa.table({
            "input_ids": make.from_arrays(offsets, pa.array(self.ids, type=pa.int32())),
            "labels": make.from_arrays(offsets, pa.array(self.labels, type=pa.int32())),
        })

    def to_dataset(self) -> Any:
        from datasets import Dataset
        from datasets.table import InMemoryTable

        # a fingerprint of our own: otherwise datasets hashes the whole table (seconds for millions of tokens)
        return Dataset(InMemoryTable(self.to_table()), fingerprint=f"ft-{uuid.uuid4().hex}")


def gather_ranges(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``values[starts[i]:starts[i]+lengths[i]]`` for every i, concatenated.

    Copying slices is an order of magnitude faster than fancy indexing with a per-token index
    when samples are long; for very short samples the index is cheaper than many slices.
    """
    total = int(lengths.sum())
    if len(lengths) == 0:
        return values[:0].copy()
    if total >= 16 * len(lengths):
        ends = (starts + lengths).tolist()
        return np.concatenate([values[a:b] for a, b in zip(starts.tolist(), ends, strict=True)])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return values[np.arange(total, dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)]


@dataclass
class EntryResult:
    """One dataset entry, tokenized: its samples and what was dropped (with ``file:line``)."""

    samples: Samples
    drops: list[Drop] = field(default_factory=list)
    truncated: int = 0
    tokenize_calls: int = 0
    notes: list[Drop] = field(default_factory=list)  # Notes of kept rows (reason, file:line, detail)


@dataclass
class _ChunkOut:
    job: int
    start: int
    n_rows: int
    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    rows: np.ndarray  # row index (within the entry) of each sample
    drops: list[tuple[int, str, str]]  # (row index, reason, detail)
    notes: list[tuple[int, str, str]] = field(default_factory=list)  # (row index, reason, detail)
    truncated: int = 0
    calls: int = 0
    error: tuple[int, str] | None = None  # (row index, message): a row the format failed on


# Set in the parent right before the workers fork (inherited, never pickled).
_JOBS: list[tuple[Any, Any]] | None = None
_SETTINGS: tuple[int, str] = (0, "drop")


def tokenize_entries(
    jobs: Sequence[tuple[Any, Any, str]],
    *,
    sequence_len: int,
    excess_length: str,
    num_proc: int,
    progress: bool | None = None,
) -> list[EntryResult]:
    """Tokenize every ``(raw_rows, tokenize, format_name)`` job; returns one :class:`EntryResult` per job."""
    global _JOBS, _SETTINGS
    total = sum(len(raw) for raw, _t, _n in jobs)
    num_proc = max(1, min(num_proc, (total + 63) // 64))
    # ~16 chunks per worker keep them evenly busy (long conversations make uneven chunks)
    chunk = int(min(max(total // (num_proc * 16), 16), 2048))
    tasks = [(j, s, min(s + chunk, len(raw))) for j, (raw, _t, _n) in enumerate(jobs) for s in range(0, len(raw), chunk)]
    show = _progress_enabled() if progress is None else progress
    bar = _progress_bar(total, show)

    _JOBS = [(raw, tok) for raw, tok, _n in jobs]
    _SETTINGS = (sequence_len, excess_length)
    outs: list[_ChunkOut] = []
    try:
        if num_proc == 1 or total < INLINE_BELOW_ROWS:
            for task in tasks:
                outs.append(_run_chunk((*task, None)))
                bar.update(outs[-1].n_rows)
        else:
            outs = _run_pool(jobs, tasks, num_proc, bar)
    finally:
        _JOBS = None
        bar.close()

    results: list[EntryResult] = []
    base = 0
    for j, (raw, _tok, name) in enumerate(jobs):
        mine = [o for o in outs if o.job == j]
        for o in mine:
            if o.error is not None:
                row, message = o.error
                raise DataError(f"{raw.where(row)}: the '{name}' format failed on this row: {message}")
        drops = [Drop(reason, raw.where(row), detail) for o in mine for row, reason, detail in o.drops]
        notes = [Drop(reason, raw.where(row), detail) for o in mine for row, reason, detail in o.notes]
        samples = _merge(mine, base)
        results.append(EntryResult(samples, drops, sum(o.truncated for o in mine), sum(o.calls for o in mine),
                                   notes))
        base += len(raw)
    return results


def _merge(outs: list[_ChunkOut], base: int) -> Samples:
    if not outs:
        return Samples.empty()
    lengths = np.concatenate([o.lengths for o in outs]).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Samples(
        np.concatenate([o.ids for o in outs]),
        np.concatenate([o.labels for o in outs]),
        offsets,
        np.concatenate([o.rows for o in outs]).astype(np.int64) + base,
    )


def _run_pool(jobs: Sequence[tuple[Any, Any, str]], tasks: list, num_proc: int, bar: Any) -> list[_ChunkOut]:
    method = start_method()
    fork = method == "fork"
    ctx = mp.get_context(method)
    # Workers must not start tokenizers' own thread pool on top of ours (and the library warns
    # about forking after it was used unless this is set at fork time).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        if fork:
            pool = ctx.Pool(num_proc)
            payload = [(*t, None) for t in tasks]
        else:
            pool = ctx.Pool(num_proc, initializer=_init_spawned,
                            initargs=([(None, tok) for _r, tok, _n in jobs], _SETTINGS))
            payload = [(j, s, e, jobs[j][0].batch(s, e)) for j, s, e in tasks]
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    # The parent waits while workers tokenize: import what assembling the result needs meanwhile
    # (only now, after the fork: a child must never inherit a half-held import lock).
    threading.Thread(target=_warm_imports, daemon=True).start()
    outs = []
    with pool:
        for out in pool.imap(_run_chunk, payload, chunksize=1):
            outs.append(out)
            bar.update(out.n_rows)
    return outs


def _warm_imports() -> None:
    try:
        import datasets  # noqa: F401
    except Exception:  # noqa: BLE001 - the main thread imports it again and reports any error
        pass


def start_method() -> str:
    """``fork`` on Linux (workers inherit rows and tokenizer); ``spawn`` elsewhere (fork is unsafe on macOS)."""
    return "fork" if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods() else "spawn"


def _init_spawned(jobs: list, settings: tuple[int, str]) -> None:
    global _JOBS, _SETTINGS
    _JOBS, _SETTINGS = jobs, settings


def _run_chunk(task: tuple[int, int, int, list | None]) -> _ChunkOut:
    j, start, stop, rows = task
    assert _JOBS is not None
    raw, tokenize = _JOBS[j]
    if rows is None:
        rows = raw.batch(start, stop)
    seq_len, excess = _SETTINGS
    out = _ChunkOut(j, start, len(rows), *_EMPTY_ARRAYS(), drops=[])

    results, calls, error = _call_tokenize(tokenize, rows)
    out.calls = calls
    if error is not None:
        out.error = (start + error[0], error[1])
        return out
    if len(results) != len(rows):
        out.error = (start, f"its tokenize function returned {len(results)} results for {len(rows)} rows "
                            "(a bug in the format plugin: it must return one item per row)")
        return out

    id_parts: list[Any] = []
    label_parts: list[Any] = []
    lengths: list[int] = []
    sample_rows: list[int] = []
    for k, res in enumerate(results):
        row = start + k
        if isinstance(res, Dropped):
            out.drops.append((row, res.reason, res.detail))
            continue
        samples = res if isinstance(res, list) else (res,)
        if not samples:
            out.drops.append((row, EMPTY, "the row produced no tokens"))
            continue
        for s in samples:
            ids, labels = s["input_ids"], s["labels"]
            for note in s.get("notes") or ():
                out.notes.append((row, note[0], note[1]))
            if len(ids) != len(labels):
                out.error = (row, f"it returned {len(ids)} input_ids but {len(labels)} labels "
                                  "(a bug in the format plugin: they must have equal length)")
                return out
            id_parts.append(ids)
            label_parts.append(labels)
            lengths.append(len(ids))
            sample_rows.append(row)

    n_tokens = sum(lengths)
    ids_arr = _flatten(id_parts, n_tokens)
    labels_arr = _flatten(label_parts, n_tokens)
    len_arr = np.asarray(lengths, dtype=np.int64)
    rows_arr = np.asarray(sample_rows, dtype=np.int64)
    offsets = np.zeros(len(len_arr) + 1, dtype=np.int64)
    np.cumsum(len_arr, out=offsets[1:])

    keep = len_arr > 0
    for i in np.flatnonzero(~keep):
        out.drops.append((int(rows_arr[i]), EMPTY, "the row produced an empty sample"))

    long = len_arr > seq_len
    if long.any():
        if excess == "truncate":
            pos = np.arange(n_tokens, dtype=np.int64) - np.repeat(offsets[:-1], len_arr)
            inside = pos < seq_len
            ids_arr, labels_arr = ids_arr[inside], labels_arr[inside]
            out.truncated = int(long.sum())
            len_arr = np.minimum(len_arr, seq_len)
            offsets = np.zeros(len(len_arr) + 1, dtype=np.int64)
            np.cumsum(len_arr, out=offsets[1:])
        else:  # drop, or error (the parent raises with every example)
            for i in np.flatnonzero(long & keep):
                out.drops.append((int(rows_arr[i]), TOO_LONG, f"{int(len_arr[i])} tokens > {seq_len}"))
            keep &= ~long

    # The first label of a sample never is a target (the model shifts labels by one), so a
    # sample trains on something only if a label after its first position is not -100.
    trained = labels_arr != IGNORE_INDEX
    nonempty_starts = offsets[:-1][len_arr > 0]
    trained[nonempty_starts] = False
    csum = np.zeros(len(trained) + 1, dtype=np.int64)
    np.cumsum(trained, out=csum[1:])
    n_trained = csum[offsets[1:]] - csum[offsets[:-1]]
    nothing = keep & (n_trained == 0)
    for i in np.flatnonzero(nothing):
        out.drops.append((int(rows_arr[i]), NOTHING_TO_TRAIN,
                          f"all {int(len_arr[i])} labels are masked (-100)"))
    keep &= ~nothing

    if not keep.all():
        token_keep = np.repeat(keep, len_arr)
        ids_arr, labels_arr = ids_arr[token_keep], labels_arr[token_keep]
        len_arr, rows_arr = len_arr[keep], rows_arr[keep]
    out.ids, out.labels, out.lengths = ids_arr, labels_arr, len_arr.astype(np.int32)
    out.rows = rows_arr
    out.drops.sort(key=lambda d: d[0])
    return out


def _EMPTY_ARRAYS() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    z = np.zeros(0, dtype=np.int32)
    return z, z, z, np.zeros(0, dtype=np.int64)


def _call_tokenize(tokenize: Any, rows: list[dict]) -> tuple[list[Any], int, tuple[int, str] | None]:
    """Call the batched tokenize; if the batch raises, retry row by row to find the culprit."""
    try:
        return list(tokenize(rows)), 1, None
    except Exception:  # noqa: BLE001 - fall back to single rows to name the row that failed
        pass
    results: list[Any] = []
    calls = 1
    for k, row in enumerate(rows):
        calls += 1
        try:
            got = tokenize([row])
        except Dropped as exc:
            results.append(exc)
            continue
        except FtError as exc:
            return results, calls, (k, str(exc))
        except Exception as exc:  # noqa: BLE001
            return results, calls, (k, f"{type(exc).__name__}: {exc}")
        results.extend(got)
    return results, calls, None


def _flatten(parts: list[Any], total: int) -> np.ndarray:
    if parts and isinstance(parts[0], np.ndarray):
        return np.concatenate(parts).astype(np.int32, copy=False)
    return np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int32, count=total)


def _progress_enabled() -> bool:
    if os.environ.get("FT_NO_PROGRESS"):
        return False
    return os.environ.get("RANK", "0") == "0"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="tokenizing", unit=" rows", mininterval=0.5, dynamic_ncols=True, leave=False)
