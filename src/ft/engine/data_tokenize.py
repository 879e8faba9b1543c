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

from ft.engine.columns import (
    NOTES,
    column_starts,
    drop_equal_samples,
    drop_equal_sides,
    is_labels_column,
    is_token_column,
    labels_of,
    too_long_detail,
)
from ft.engine.launch import is_main_process
from ft.kernel.errors import DataError, FtError
from ft.kernel.formats import IGNORE_INDEX, Drop, Dropped

# Reasons (kept in sync with ft.engine.data, which re-exports them).
EMPTY = "empty"
TOO_LONG = "longer than sequence_len"
NOTHING_TO_TRAIN = "nothing to train"

INLINE_BELOW_ROWS = 2000  # fewer rows than this: forking workers costs more than it saves


def join_extras(parts: Sequence[tuple[dict[str, list[Any]], int]]) -> dict[str, list[Any]]:
    """The extra columns of consecutive parts, given as (extras, sample count), as one: None where a part
    lacks a column."""
    names = list(dict.fromkeys(n for extras, _count in parts for n in extras))
    return {n: [v for extras, count in parts for v in extras.get(n, [None] * count)] for n in names}


@dataclass
class Samples:
    """Tokenized samples as flat arrays, one pair (values, offsets) per token column: sample ``i``
    of column ``c`` is ``tokens[c][0][offsets[i]:offsets[i+1]]`` with ``offsets = tokens[c][1]``.

    SFT samples have the token columns ``input_ids`` and ``labels``; other methods' have theirs
    (``chosen_input_ids`` ...). ``extras`` holds every other column a format returned (a reward's
    ``answer``, KTO's ``label``), one Python value per sample. ``groups`` holds a number per
    sample that is unique per source row (samples from one row share it), so shuffling and eval
    splits keep a row's samples together.
    """

    tokens: dict[str, tuple[np.ndarray, np.ndarray]]
    groups: np.ndarray
    extras: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.groups)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample, over every ``*input_ids`` column."""
        total = np.zeros(self.count, dtype=np.int64)
        for name, (_values, offsets) in self.tokens.items():
            if name.endswith("input_ids"):
                total += np.diff(offsets)
        return total

    @classmethod
    def empty(cls) -> Samples:
        return cls({}, np.zeros(0, dtype=np.int64))

    @classmethod
    def concat(cls, parts: Sequence[Samples]) -> Samples:
        parts = [p for p in parts if p.count]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        names = list(parts[0].tokens)
        for p in parts[1:]:
            if list(p.tokens) != names:
                raise DataError(f"datasets give different token columns ({', '.join(names)} and "
                                f"{', '.join(p.tokens)}); use formats of the same method together.")
        tokens = {}
        for name in names:
            offsets = [parts[0].tokens[name][1]]
            base = parts[0].tokens[name][1][-1]
            for p in parts[1:]:
                offsets.append(p.tokens[name][1][1:] + base)
                base += p.tokens[name][1][-1]
            tokens[name] = (np.concatenate([p.tokens[name][0] for p in parts]), np.concatenate(offsets))
        extras = join_extras([(p.extras, p.count) for p in parts])
        return cls(tokens, np.concatenate([p.groups for p in parts]), extras)

    def take(self, idx: np.ndarray) -> Samples:
        """Samples ``idx`` in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        tokens = {}
        for name, (values, offsets) in self.tokens.items():
            lengths = np.diff(offsets)[idx]
            new = np.zeros(len(idx) + 1, dtype=np.int64)
            np.cumsum(lengths, out=new[1:])
            tokens[name] = (gather_ranges(values, offsets[:-1][idx], lengths), new)
        extras = {n: [vals[i] for i in idx.tolist()] for n, vals in self.extras.items()}
        return Samples(tokens, self.groups[idx], extras)

    def trained_tokens(self) -> int:
        """Labels that are trained, over every labels column (a sequence's first label is never a
        target: labels shift)."""
        total = 0
        for name, (values, offsets) in self.tokens.items():
            if not is_labels_column(name):
                continue
            trained = values != IGNORE_INDEX
            starts = offsets[:-1][np.diff(offsets) > 0]
            total += int(trained.sum() - trained[starts].sum())
        return total

    def to_table(self) -> Any:
        import pyarrow as pa

        columns: dict[str, Any] = {}
        for name, (values, offsets) in self.tokens.items():
            large = offsets[-1] >= 2**31 - 1
            arrow_offsets = pa.array(offsets, type=pa.int64() if large else pa.int32())
            make = pa.LargeListArray if large else pa.ListArray
            columns[name] = make.from_arrays(arrow_offsets, pa.array(values, type=pa.int32()))
        for name, values in self.extras.items():
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise DataError(f"column '{name}' holds values of mixed types that cannot be stored ({exc}); "
                                "make the format return one type per column.") from None
        return pa.table(columns)

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
    tokens: dict[str, tuple[np.ndarray, np.ndarray]]  # column -> (flat values, lengths)
    rows: np.ndarray  # row index (within the entry) of each sample
    drops: list[tuple[int, str, str]]  # (row index, reason, detail)
    notes: list[tuple[int, str, str]] = field(default_factory=list)  # (row index, reason, detail)
    extras: dict[str, list[Any]] = field(default_factory=dict)
    truncated: int = 0
    calls: int = 0
    error: tuple[int, str] | None = None  # (row index, message): a row the format failed on


# Set in the parent right before the workers fork (inherited, never pickled).
_JOBS: list[tuple[Any, Any]] | None = None
_SETTINGS: tuple[int, str, tuple[str, ...], str] = (0, "drop", (), "")


def tokenize_entries(
    jobs: Sequence[tuple[Any, Any, str]],
    *,
    sequence_len: int,
    excess_length: str,
    num_proc: int,
    progress: bool | None = None,
    columns: Sequence[str] = (),
    method: str = "",
    plugins: Sequence[str] | None = None,
) -> list[EntryResult]:
    """Tokenize every ``(raw_rows, tokenize, format_name)`` job; returns one :class:`EntryResult` per job.

    ``columns`` are the columns the training method ``method`` reads: every sample a format returns
    must have them (checked on each chunk's first sample), else the build stops with an error that
    names the format, its plugin (``plugins``: one per job) and the row.
    """
    global _JOBS, _SETTINGS
    total = sum(len(raw) for raw, _t, _n in jobs)
    num_proc = max(1, min(num_proc, (total + 63) // 64))
    # ~16 chunks per worker keep them evenly busy (long conversations make uneven chunks)
    chunk = int(min(max(total // (num_proc * 16), 16), 2048))
    tasks = [(j, s, min(s + chunk, len(raw))) for j, (raw, _t, _n) in enumerate(jobs) for s in range(0, len(raw), chunk)]
    show = _progress_enabled() if progress is None else progress
    bar = _progress_bar(total, show)

    _JOBS = [(raw, tok) for raw, tok, _n in jobs]
    _SETTINGS = (sequence_len, excess_length, tuple(columns), method)
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
                owner = f" (plugin '{plugins[j]}')" if plugins and plugins[j] else ""
                raise DataError(f"{raw.where(row)}: the '{name}' format{owner} failed on this row: {message}")
        drops = [Drop(reason, raw.where(row), detail) for o in mine for row, reason, detail in o.drops]
        notes = [Drop(reason, raw.where(row), detail) for o in mine for row, reason, detail in o.notes]
        samples = _merge(mine, base)
        results.append(EntryResult(samples, drops, sum(o.truncated for o in mine), sum(o.calls for o in mine),
                                   notes))
        base += len(raw)
    return results


def _merge(outs: list[_ChunkOut], base: int) -> Samples:
    outs = [o for o in outs if len(o.rows)]
    if not outs:
        return Samples.empty()
    names = list(outs[0].tokens)
    for o in outs[1:]:
        if list(o.tokens) != names:
            raise DataError(f"the format returned different columns for different rows ({', '.join(names)} and "
                            f"{', '.join(o.tokens)}); a format must return the same token columns for every row.")
    tokens = {}
    for name in names:
        lengths = np.concatenate([o.tokens[name][1] for o in outs]).astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens[name] = (np.concatenate([o.tokens[name][0] for o in outs]), offsets)
    extras = join_extras([(o.extras, len(o.rows)) for o in outs])
    return Samples(tokens, np.concatenate([o.rows for o in outs]).astype(np.int64) + base, extras)


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


def _init_spawned(jobs: list, settings: tuple[int, str, tuple[str, ...], str]) -> None:
    global _JOBS, _SETTINGS
    _JOBS, _SETTINGS = jobs, settings


def _run_chunk(task: tuple[int, int, int, list | None]) -> _ChunkOut:
    j, start, stop, rows = task
    assert _JOBS is not None
    raw, tokenize = _JOBS[j]
    if rows is None:
        rows = raw.batch(start, stop)
    seq_len, excess, _columns, _method = _SETTINGS
    out = _ChunkOut(j, start, len(rows), {}, np.zeros(0, dtype=np.int64), drops=[])

    results, calls, error = _call_tokenize(tokenize, rows)
    out.calls = calls
    if error is not None:
        out.error = (start + error[0], error[1])
        return out
    if len(results) != len(rows):
        out.error = (start, f"its tokenize function returned {len(results)} results for {len(rows)} rows "
                            "(a bug in the format plugin: it must return one item per row)")
        return out

    collected = _collect(results, start, out)
    if collected is None:
        return out
    parts, extras, sample_rows = collected
    rows_arr = np.asarray(sample_rows, dtype=np.int64)
    try:
        columns = {name: _flat(values) for name, values in parts.items()}  # name -> (flat, lengths)
    except (TypeError, ValueError, OverflowError) as exc:
        bad = next(n for n, values in parts.items() if not _int_lists(values))
        k = next(k for k, v in enumerate(parts[bad]) if not _int_lists([v]))
        out.error = (sample_rows[k], f"its '{bad}' is not a list of token ids ({type(exc).__name__}: {exc}); "
                                     "token columns hold lists of ints")
        return out
    keep = np.ones(len(rows_arr), dtype=bool)

    sequences = [name for name in columns if name.endswith("input_ids")]
    for name in sequences:  # every sequence must hold tokens
        for i in np.flatnonzero(keep & (columns[name][1] == 0)):
            out.drops.append((int(rows_arr[i]), EMPTY, "the row produced an empty sample"))
            keep[i] = False

    long = np.zeros(len(rows_arr), dtype=bool)
    for name in sequences:
        long |= columns[name][1] > seq_len
    if long.any():
        if excess == "truncate":
            for name in list(columns):
                columns[name] = _truncate(*columns[name], seq_len)
            drop_equal_sides(columns, sequences, long, keep, rows_arr, out, seq_len)
            drop_equal_samples(columns, long, keep, rows_arr, out, seq_len)
        else:  # drop, or error (the parent raises with every example)
            starts = column_starts(columns)
            for i in np.flatnonzero(long & keep):
                out.drops.append((int(rows_arr[i]), TOO_LONG, too_long_detail(columns, starts, sequences, i, seq_len)))
            keep &= ~long

    # The first label of a sequence never is a target (the model shifts labels by one), so a
    # sequence trains on something only if a label after its first position is not -100.
    for name in [n for n in columns if is_labels_column(n)]:
        values, lengths = columns[name]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        trained = values != IGNORE_INDEX
        trained[offsets[:-1][lengths > 0]] = False
        csum = np.zeros(len(trained) + 1, dtype=np.int64)
        np.cumsum(trained, out=csum[1:])
        nothing = keep & ((csum[offsets[1:]] - csum[offsets[:-1]]) == 0)
        side = "" if name == "labels" else f" of {name[: -len('_labels')]}"
        for i in np.flatnonzero(nothing):
            cut = f" after truncation to sequence_len {seq_len}" if long[i] and excess == "truncate" else ""
            out.drops.append((int(rows_arr[i]), NOTHING_TO_TRAIN,
                              f"all {int(lengths[i])} labels{side} are masked (-100){cut}"))
        keep &= ~nothing
    if excess == "truncate":  # truncated rows that are kept; those dropped above count as drops only
        out.truncated = int((long & keep).sum())

    if not keep.all():
        for name, (values, lengths) in columns.items():
            columns[name] = (values[np.repeat(keep, lengths)], lengths[keep])
        rows_arr = rows_arr[keep]
        kept = np.flatnonzero(keep).tolist()
        extras = {n: [vals[i] for i in kept] for n, vals in extras.items()}
    out.tokens = {name: (values, lengths.astype(np.int32)) for name, (values, lengths) in columns.items()}
    out.extras = extras
    out.rows = rows_arr
    out.drops.sort(key=lambda d: d[0])
    return out


def _collect(results: list[Any], start: int, out: _ChunkOut) -> tuple[dict, dict, list[int]] | None:
    """Split the format's results into token columns, extra columns and the row of each sample;
    record drops; None (with ``out.error`` set) when the format broke its contract."""
    parts: dict[str, list[Any]] | None = None
    extras: dict[str, list[Any]] = {}
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
            for note in s.get(NOTES) or ():  # Notes about a kept row: counted in the data report
                out.notes.append((row, note[0], note[1]))
            if parts is None:
                problem = _column_problem(s)
                if problem:
                    out.error = (row, problem)
                    return None
                parts = {name: [] for name in s if is_token_column(name)}
                extras = {name: [] for name in s if not is_token_column(name) and name != NOTES}
                if not any(name.endswith("input_ids") for name in parts):
                    out.error = (row, f"it returned a sample without token ids (keys: {', '.join(s)}); a sample "
                                      "needs input_ids (or a prefixed form such as chosen_input_ids)")
                    return None
            for name, values in parts.items():
                try:
                    values.append(s[name])
                except KeyError:
                    out.error = (row, f"it returned a sample without '{name}', which the other samples have")
                    return None
            for name, values in extras.items():
                values.append(s.get(name))
            for name in parts:
                if name.endswith("input_ids") and labels_of(name) in parts and len(s[name]) != len(s[labels_of(name)]):
                    out.error = (row, f"it returned {len(s[name])} {name} but {len(s[labels_of(name)])} "
                                      f"{labels_of(name)} (a bug in the format plugin: they must have equal length)")
                    return None
            sample_rows.append(row)
    return parts or {"input_ids": [], "labels": []}, extras, sample_rows


def _column_problem(sample: Any) -> str | None:
    """What is wrong with a sample a format returned, against the columns the method reads (checked on the
    first sample of each chunk: a format returns the same keys for every row)."""
    _seq, _excess, columns, method = _SETTINGS
    if not isinstance(sample, dict):
        return (f"it returned a {type(sample).__name__} for a row, not a dict of columns (a bug in the format "
                "plugin: a row gives a dict, a list of dicts, or ft.api.Dropped)")
    missing = [c for c in columns if c not in sample]
    if missing:
        keys = ", ".join(k for k in sample if k != NOTES) or "none"
        return (f"it returned a sample with the columns {keys}, but method '{method}' reads {', '.join(columns)} "
                f"(missing: {', '.join(missing)}). A bug in the format plugin: its samples must have the columns "
                "it declares (register.add(..., columns=...)), under those names")
    for name, value in sample.items():
        if is_token_column(name) and not _looks_like_ids(value):
            shown = repr(value)[:60]
            return f"its '{name}' is not a list of token ids (got {shown}); token columns hold lists of ints"
    return None


def _looks_like_ids(value: Any) -> bool:
    """Whether ``value`` is a list (tuple, array) of ints, judged on its first elements (cheap)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.dtype.kind in "iu"
    if not isinstance(value, (list, tuple)):
        return False
    return all(type(x) is int or isinstance(x, np.integer) for x in value[:16])


def _int_lists(values: list[Any]) -> bool:
    try:
        _flat(values)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _flat(parts: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    return _flatten(parts, int(lengths.sum())), lengths


def _truncate(values: np.ndarray, lengths: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    if not (lengths > limit).any():
        return values, lengths
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pos = np.arange(len(values), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    return values[pos < limit], np.minimum(lengths, limit)


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
    return not os.environ.get("FT_NO_PROGRESS") and is_main_process()


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
