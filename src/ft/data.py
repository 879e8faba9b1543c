"""From rows on disk to the rows the Trainer consumes: read, tokenize, filter, split, pack, cache.

``prepare_datasets(ctx, tokenizer)`` is the one entry point (``run.py`` calls it):

1. The cache key is computed first (``ft.cache``): data-file contents (``ft_data_fingerprint``),
   the tokenizer, the config keys that change the output and the data plugins' versions. A hit
   loads the prepared dataset memory-mapped and reads nothing else.
2. On a miss, each dataset entry is read by ``ft_load_dataset`` into :class:`RawRows` (rows
   plus where each came from, plus the rows that could not be read), and tokenized by its
   format's ``Tokenize`` in parallel worker processes (``ft.data_tokenize``).
3. Samples longer than ``sequence_len`` are dropped, truncated or refused (``excess_length``);
   samples with no trained label are dropped ("nothing to train"). Every drop is counted by
   reason with the ``file:line`` of its row; ``strict: true`` turns any drop into an error.
4. Entries are concatenated, shuffled with the seed, and the eval part is split off
   (``val_set_size``) and/or read from ``test_datasets``.
5. If a packing plugin is selected, ``ft_pack`` packs the training samples into bins.
6. The result is written atomically into ``dataset_prepared_path/<key>/`` with a drop report
   (``report.json``) and figures (``stats.json``).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ft.errors import DataError

if TYPE_CHECKING:
    import datasets

    from ft.context import Context

log = logging.getLogger("ft.data")

# Reasons a row or sample is dropped (formats may add their own through ``Dropped``).
MALFORMED = "malformed"
EMPTY = "empty"
TOO_LONG = "longer than sequence_len"
NOTHING_TO_TRAIN = "nothing to train"

EXAMPLES_PER_REASON = 20  # kept in report.json; the log shows the first few


# -- what a source plugin returns ------------------------------------------------------------


@dataclass
class Drop:
    """One row that was dropped: why, where it came from (``file:line``), and details."""

    reason: str
    where: str
    detail: str = ""


@dataclass
class RowPart:
    """Rows read from one file (or one hub split), with where each row came from.

    ``rows`` is a list of dicts or a ``pyarrow.Table``. ``lines`` holds the 1-based line of
    each row in ``file`` (JSONL: "file:12"), or its number in another ``unit`` ("file: item 3"
    for a JSON array); when it is None rows are numbered in order ("file: row N").
    """

    rows: Any
    file: str
    lines: Sequence[int] | None = None
    unit: str = "line"

    def __len__(self) -> int:
        return len(self.rows) if not hasattr(self.rows, "num_rows") else self.rows.num_rows

    def slice(self, start: int, stop: int) -> list[dict[str, Any]]:
        if isinstance(self.rows, list):
            return self.rows[start:stop]
        return self.rows.slice(start, stop - start).to_pylist()

    def where(self, i: int) -> str:
        if self.lines is None:
            return f"{self.file}: row {i + 1}"
        if self.unit == "line":
            return f"{self.file}:{self.lines[i]}"
        return f"{self.file}: {self.unit} {self.lines[i]}"


@dataclass
class RawRows:
    """What ``ft_load_dataset`` returns: rows, the origin of each row, and rows dropped while reading.

    Rows are kept in parts (one per file) so a directory of files needs no copy; ``batch``
    and ``where`` address rows by their index across all parts.
    """

    source: str
    parts: list[RowPart] = field(default_factory=list)
    dropped: list[Drop] = field(default_factory=list)
    blank_lines: int = 0  # blank lines in JSONL files: not rows, counted for the record

    def __post_init__(self) -> None:
        self._starts: list[int] = []
        total = 0
        for part in self.parts:
            self._starts.append(total)
            total += len(part)
        self._len = total

    @classmethod
    def from_rows(cls, rows: Any, file: str, lines: Sequence[int] | None = None,
                  dropped: list[Drop] | None = None) -> RawRows:
        return cls(file, [RowPart(rows, file, lines)], list(dropped or []))

    def __len__(self) -> int:
        return self._len

    def batch(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Rows ``start:stop`` as dicts (across file boundaries)."""
        out: list[dict[str, Any]] = []
        k = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while start < stop and k < len(self.parts):
            part, base = self.parts[k], self._starts[k]
            end = min(stop, base + len(part))
            out.extend(part.slice(start - base, end - base))
            start, k = end, k + 1
        return out

    def where(self, i: int) -> str:
        """``file:line`` (or ``file: row N``) of row ``i``."""
        k = bisect.bisect_right(self._starts, i) - 1
        return self.parts[k].where(i - self._starts[k])


# -- what prepare_datasets returns -----------------------------------------------------------


@dataclass
class PreparedData:
    """Tokenized (and possibly packed) training data, with what was dropped and why.

    ``train`` and ``eval`` have columns ``input_ids`` and ``labels`` (plus ``position_ids`` when
    packed); the Trainer consumes them with ``remove_unused_columns=False``.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    packed: bool
    report: dict[str, Any]
    stats: dict[str, Any]
    cache_dir: str


def prepare_datasets(ctx: Context, tokenizer: Any) -> PreparedData:
    """Tokenize, filter, split and pack ``cfg.datasets`` (and ``test_datasets``), cached by content."""
    from ft import cache

    cfg = ctx.cfg
    t0 = time.perf_counter()
    packing = _packing_active(ctx)
    key, key_inputs = cache.cache_key(ctx, tokenizer, packing)
    root = cache.prepared_root(cfg)

    with cache.build_lock(root, key):
        found = cache.load(root, key)
        if found is not None:
            data = _from_cache(found, cfg)
            log.info("prepared data: using the cache %s (%s)", data.cache_dir, _one_line(data.stats))
            _log_drops(data.report)
            return data

        report, stats, train, eval_ds = _build(ctx, tokenizer, packing)
        t1 = time.perf_counter()
        stats["seconds"] = round(t1 - t0, 3)  # updated below, once written
        path = cache.store(root, key, key_inputs, train, eval_ds, report, stats)
        cache.update_stats(path, write_seconds=round(time.perf_counter() - t1, 3),
                           seconds=round(time.perf_counter() - t0, 3))
        found = cache.load(root, key)
        assert found is not None, path
        data = _from_cache(found, cfg, check_strict=False)
        data.stats["cache"] = "built"
        _log_report(report, stats, path)
        return data


def _packing_active(ctx: Context) -> bool:
    return bool(ctx.pm.calls.packers())


def _from_cache(found: dict[str, Any], cfg: Any, check_strict: bool = True) -> PreparedData:
    report, stats = found["report"], dict(found["stats"])
    if check_strict and cfg.strict and report.get("dropped_total"):
        raise DataError(_strict_message(report))
    stats.setdefault("cache", "hit")
    return PreparedData(found["train"], found["eval"], bool(stats.get("packed")), report, stats, found["path"])


# -- building ---------------------------------------------------------------------------------


def _build(ctx: Context, tokenizer: Any, packing: bool) -> tuple[dict, dict, Any, Any]:
    import numpy as np

    from ft.data_tokenize import Samples, tokenize_entries

    cfg = ctx.cfg
    t0 = time.perf_counter()

    jobs = []  # (key_path, entry, raw, tokenize) for datasets then test_datasets
    for group in ("datasets", "test_datasets"):
        for i, entry in enumerate(getattr(cfg, group) or []):
            raw = ctx.pm.calls.load_dataset(cfg, entry)
            if raw is None:
                raise DataError(f"{cfg.where(group, i, 'path')}: no active plugin can read '{entry.path}'. "
                                "Is the 'sources' plugin blocked, or does this source need a plugin? See `ft plugins`.")
            fmt = ctx.formats.get(entry.type, cfg.where(group, i, "type")).value
            tokenize = fmt.build(cfg, entry, tokenizer)
            jobs.append((group, i, entry, raw, tokenize))
    read_s = time.perf_counter() - t0

    results = tokenize_entries(
        [(raw, tokenize, entry.type) for _g, _i, entry, raw, tokenize in jobs],
        sequence_len=cfg.sequence_len,
        excess_length=cfg.excess_length,
        num_proc=cfg.dataset_num_proc or _cpu_count(),
    )
    tok_s = time.perf_counter() - t0 - read_s

    drops: list[Drop] = []
    rows_read = 0
    per_entry = []
    for (group, _i, entry, raw, _tok), res in zip(jobs, results, strict=True):
        drops.extend(raw.dropped)
        drops.extend(res.drops)
        rows_read += len(raw) + len(raw.dropped)
        per_entry.append({
            "path": entry.path, "type": entry.type, "group": group,
            "rows_read": len(raw) + len(raw.dropped), "samples": int(res.samples.count),
            "dropped": len(raw.dropped) + len(res.drops), "truncated": res.truncated, "blank_lines": raw.blank_lines,
        })

    too_long = [d for d in drops if d.reason == TOO_LONG]
    if cfg.excess_length == "error" and too_long:
        raise DataError(
            f"{len(too_long)} sample(s) are longer than sequence_len={cfg.sequence_len} "
            f"({cfg.where('excess_length')}: error):\n" + _examples(too_long, 10)
            + "\nRaise sequence_len, or set excess_length: drop or truncate."
        )
    report = build_report(drops, rows_read)
    if cfg.strict and drops:
        raise DataError(_strict_message(report))

    train_parts = [r.samples for (g, *_), r in zip(jobs, results, strict=True) if g == "datasets"]
    test_parts = [r.samples for (g, *_), r in zip(jobs, results, strict=True) if g == "test_datasets"]
    train = Samples.concat(train_parts)
    if train.count == 0:
        raise DataError("no training samples are left after reading and tokenizing the datasets.\n"
                        + _report_text(report) + "\nSee the reasons above; `ft preprocess --debug 5` shows labels.")

    rng = np.random.default_rng(cfg.seed)
    eval_parts: list[Samples] = []
    if cfg.val_set_size:
        train, held_out = _split_eval(train, cfg, rng)
        eval_parts.append(held_out)
    elif cfg.shuffle:
        train = train.take(_group_permutation(train.groups, rng))
    eval_parts.extend(test_parts)
    eval_samples = Samples.concat(eval_parts) if eval_parts else None

    train_ds = train.to_dataset()
    eval_ds = eval_samples.to_dataset() if eval_samples is not None and eval_samples.count else None

    stats: dict[str, Any] = {
        "rows": rows_read,
        "samples": int(train.count),
        "eval_samples": int(eval_samples.count) if eval_samples is not None else 0,
        "tokens": int(train.lengths.sum()),
        "trained_tokens": int(train.trained_tokens()),
        "dropped": report["dropped_total"],
        "truncated": sum(e["truncated"] for e in per_entry),
        "packed": False,
        "sequence_len": cfg.sequence_len,
        "read_seconds": round(read_s, 3),
        "tokenize_seconds": round(tok_s, 3),
        "entries": per_entry,
    }
    stats["assemble_seconds"] = round(time.perf_counter() - t0 - read_s - tok_s, 3)
    if packing:
        t1 = time.perf_counter()
        packed = ctx.pm.calls.pack(cfg, train_ds, ctx.method)
        if packed is not None:
            train_ds = packed
            stats["packed"] = True
            stats["bins"] = len(packed)
            # a bin holds what one unpacked row could: sequence_len per sequence of the method's rows
            sequences = sum(1 for c in ctx.method.columns if c.endswith("input_ids")) or 1
            stats["bin_tokens"] = sequences * cfg.sequence_len
            stats["packing_efficiency"] = round(stats["tokens"] / (len(packed) * stats["bin_tokens"]), 6)
            stats["pack_seconds"] = round(time.perf_counter() - t1, 3)
    return report, stats, train_ds, eval_ds


def _split_eval(train: Any, cfg: Any, rng: Any) -> tuple[Any, Any]:
    """Hold out whole rows (all samples of a row go to one side) with the seed."""
    import numpy as np

    perm = _group_permutation(train.groups, rng, return_groups=True)
    n_groups = len(perm)
    size = cfg.val_set_size
    k = int(round(size * n_groups)) if size < 1 else int(size)
    k = max(k, 1)
    if k >= n_groups:
        raise DataError(f"{cfg.where('val_set_size')}: val_set_size={size} holds out {k} of {n_groups} rows, "
                        "leaving nothing to train on. Use a smaller fraction or count.")
    eval_groups = perm[:k]
    is_eval = np.isin(train.groups, eval_groups)
    eval_idx = np.flatnonzero(is_eval)
    if cfg.shuffle:
        rank = np.empty(int(train.groups.max()) + 1, dtype=np.int64)
        rank[perm] = np.arange(n_groups)
        train_idx = np.flatnonzero(~is_eval)
        train_idx = train_idx[np.argsort(rank[train.groups[train_idx]], kind="stable")]
    else:
        train_idx = np.flatnonzero(~is_eval)
    return train.take(train_idx), train.take(eval_idx)


def _group_permutation(groups: Any, rng: Any, return_groups: bool = False) -> Any:
    """Sample order that shuffles rows (groups) with ``rng``, keeping a row's samples together."""
    import numpy as np

    uniq = np.unique(groups)
    perm = uniq[rng.permutation(len(uniq))]
    if return_groups:
        return perm
    rank = np.empty(int(groups.max()) + 1, dtype=np.int64)
    rank[perm] = np.arange(len(perm))
    return np.argsort(rank[groups], kind="stable")


def _cpu_count() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- the drop report --------------------------------------------------------------------------


def build_report(drops: list[Drop], rows_read: int) -> dict[str, Any]:
    """Counts per reason with the first examples (``where``, ``detail``) of each."""
    by_reason: dict[str, dict[str, Any]] = {}
    for d in drops:
        entry = by_reason.setdefault(d.reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append({"where": d.where, "detail": d.detail})
    return {"rows_read": rows_read, "dropped_total": len(drops), "dropped": by_reason}


def _examples(drops: list[Drop], n: int) -> str:
    lines = [f"  {d.where}: {d.detail}" if d.detail else f"  {d.where}" for d in drops[:n]]
    if len(drops) > n:
        lines.append(f"  ... and {len(drops) - n} more")
    return "\n".join(lines)


def _report_text(report: dict[str, Any], per_reason: int = 3) -> str:
    lines = []
    for reason, entry in sorted(report["dropped"].items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"  dropped {entry['count']} ({reason})")
        for ex in entry["examples"][:per_reason]:
            lines.append(f"    {ex['where']}: {ex['detail']}" if ex["detail"] else f"    {ex['where']}")
        if entry["count"] > per_reason:
            lines.append(f"    ... {entry['count'] - per_reason} more in report.json")
    return "\n".join(lines) if lines else "  dropped nothing"


def _strict_message(report: dict[str, Any]) -> str:
    return (f"strict: true and {report['dropped_total']} row(s) were dropped:\n"
            + _report_text(report, per_reason=10)
            + "\nFix the rows above, or set strict: false to train without them.")


def _one_line(stats: dict[str, Any]) -> str:
    text = f"{stats.get('samples')} samples, {stats.get('tokens')} tokens"
    if stats.get("packed"):
        text += f", {stats.get('bins')} packed bins at {100 * stats.get('packing_efficiency', 0):.2f}% efficiency"
    return text


def _log_report(report: dict[str, Any], stats: dict[str, Any], path: str) -> None:
    msg = [
        f"prepared data written to {path} in {stats['seconds']:.1f}s",
        f"  rows read {stats['rows']}, samples kept {stats['samples']} (+{stats['eval_samples']} eval), "
        f"tokens {stats['tokens']}, trained tokens {stats['trained_tokens']}",
        _report_text(report),
    ]
    if stats.get("truncated"):
        msg.append(f"  truncated {stats['truncated']} sample(s) to sequence_len={stats['sequence_len']} "
                   "(excess_length: truncate)")
    if stats.get("packed"):
        msg.append(f"  packed into {stats['bins']} bins of {stats.get('bin_tokens', stats['sequence_len'])} tokens: "
                   f"efficiency {100 * stats['packing_efficiency']:.2f}%")
    log.info("\n".join(msg))


def _log_drops(report: dict[str, Any]) -> None:
    if report.get("dropped_total"):
        log.info("rows dropped when this cache was built:\n%s", _report_text(report))


def read_report(cache_dir: str) -> dict[str, Any]:
    with open(os.path.join(cache_dir, "report.json"), encoding="utf-8") as fh:
        return json.load(fh)
