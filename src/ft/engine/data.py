"""From rows on disk to the rows the Trainer consumes: read, tokenize, filter, split, pack, cache.

``prepare_datasets(ctx, tokenizer)`` is the one entry point (``run.py`` calls it):

1. The cache key is computed first (``ft.engine.cache``): data-file contents (``ft_data_fingerprint``),
   the tokenizer, the config keys that change the output and the data plugins' versions. A hit
   loads the prepared dataset memory-mapped and reads nothing else.
2. On a miss, each dataset entry is read by ``ft_load_dataset`` into :class:`RawRows` (rows
   plus where each came from, plus the rows that could not be read), and tokenized by its
   format's ``Tokenize`` in parallel worker processes (``ft.engine.data_tokenize``).
3. Samples longer than ``sequence_len`` are dropped, truncated or refused (``excess_length``; a
   drop names the side that is too long); samples with no trained label are dropped ("nothing to
   train"), and so are samples whose sequences truncation made identical ("chosen equals rejected"). Every drop is counted by
   reason with the ``file:line`` of its row; ``strict: true`` turns any drop into an error.
4. Entries are concatenated, shuffled with the seed, and the eval part is split off
   (``val_set_size``) and/or read from ``test_datasets``.
5. If a packing plugin is selected, ``ft_pack`` packs the training samples into bins (and the eval
   samples, unless ``eval_sample_packing: false``). Datasets with a ``weight`` get their share of the
   training rows first (``mix_by_weight``).
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

from ft.engine.data_report import (
    build_report,
    examples,
    log_drops,
    log_report,
    one_line,
    report_text,
    strict_message,
)
from ft.engine.data_tokenize import TOO_LONG
from ft.engine.mixing import mix_by_weight
from ft.engine.rows import RawRows, RowPart
from ft.kernel.errors import DataError
from ft.kernel.formats import IGNORE_INDEX, Drop, entry_where

if TYPE_CHECKING:
    import datasets

    from ft.kernel.context import Context

log = logging.getLogger("ft.data")

# Reasons a row or sample is dropped (formats may add their own through ``Dropped``).
MALFORMED = "malformed"


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
    _origins: Any = field(default=None, repr=False)

    def where(self, sample: int, split: str = "train") -> str:
        """``file:line`` of the row that sample ``sample`` (0-based) of ``split`` came from."""
        if self._origins is None:
            self._origins = SampleOrigins.load(self.cache_dir) or False
        found = self._origins.where(sample, split) if self._origins else None
        return found or f"{'packed bin' if self.packed and split == 'train' else 'sample'} {sample + 1}"


ORIGINS_JSON, ORIGINS_ARRAYS = "origins.json", "origins.npz"


@dataclass
class SampleOrigins:
    """Where each prepared sample came from, kept with the cache (``ft preprocess --debug`` shows it).

    ``arrays["train"]`` / ``arrays["eval"]`` hold each sample's row number across all dataset entries;
    ``parts`` say which file (and lines) a range of row numbers came from.
    """

    parts: list[dict[str, Any]]
    arrays: dict[str, Any]

    @classmethod
    def of(cls, raws: list[RawRows], train: Any, eval_samples: Any, packed: bool,
           eval_packed: bool = False) -> SampleOrigins:
        """From the entries' rows (in the order they were tokenized) and the assembled samples."""
        import numpy as np

        parts: list[dict[str, Any]] = []
        arrays: dict[str, Any] = {}
        base = 0
        for raw in raws:
            for start, part in zip(raw._starts, raw.parts, strict=True):
                key = None
                if part.lines is not None:
                    key = f"lines_{len(parts)}"
                    arrays[key] = np.asarray(part.lines, dtype=np.uint32)
                parts.append({"start": base + start, "file": part.file, "unit": part.unit, "lines": key})
            base += len(raw)
        if not packed:  # packed bins mix samples: the packer does not say which
            arrays["train"] = train.groups
        if eval_samples is not None and not eval_packed:
            arrays["eval"] = eval_samples.groups
        return cls(parts, arrays)

    def save(self, directory: str | os.PathLike) -> None:
        import numpy as np

        np.savez(os.path.join(directory, ORIGINS_ARRAYS), **self.arrays)
        with open(os.path.join(directory, ORIGINS_JSON), "w", encoding="utf-8") as fh:
            json.dump(self.parts, fh)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SampleOrigins | None:
        import numpy as np

        try:
            with open(os.path.join(directory, ORIGINS_JSON), encoding="utf-8") as fh:
                parts = json.load(fh)
            with np.load(os.path.join(directory, ORIGINS_ARRAYS)) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError):
            return None
        return cls(parts, arrays)

    def where(self, sample: int, split: str = "train") -> str | None:
        rows = self.arrays.get(split)
        if rows is None or not 0 <= sample < len(rows):
            return None
        row = int(rows[sample])
        starts = [p["start"] for p in self.parts]
        part = self.parts[bisect.bisect_right(starts, row) - 1]
        lines = self.arrays[part["lines"]] if part["lines"] else None
        return RowPart([], part["file"], lines, part["unit"]).where(row - part["start"])


def prepare_datasets(ctx: Context, tokenizer: Any) -> PreparedData:
    """Tokenize, filter, split and pack ``cfg.datasets`` (and ``test_datasets``), cached by content."""
    from ft.engine import cache
    cfg = ctx.cfg
    if any(getattr(e, "streaming", False) for e in cfg.datasets or []):  # read as training consumes it, never cached
        return _prepare_streamed(ctx, tokenizer)
    t0 = time.perf_counter()
    packing = _packing_active(ctx)
    key, key_inputs = cache.cache_key(ctx, tokenizer, packing)
    root = cache.prepared_root(cfg)

    with cache.build_lock(root, key):
        found = cache.load(root, key)
        if found is not None:
            data = _from_cache(found, cfg)
            problem = token_id_problem(data.train, tokenizer) or token_id_problem(data.eval, tokenizer)
            if problem is None:
                log.info("prepared data: using the cache %s (%s)", data.cache_dir, one_line(data.stats))
                log_drops(data.report)
                return data
            log.warning("the prepared data in %s does not fit the tokenizer (%s); rebuilding it", data.cache_dir,
                        problem)
            cache.remove(found["path"])

        report, stats, train, eval_ds, origins = _build(ctx, tokenizer, packing)
        problem = token_id_problem(train, tokenizer) or token_id_problem(eval_ds, tokenizer, "eval ")
        if problem is not None:
            formats = ", ".join(sorted({e.type for g in ("datasets", "test_datasets") for e in getattr(cfg, g) or []}))
            raise DataError(f"the prepared data has {problem}: the dataset format(s) {formats} produced token ids "
                            "the tokenizer does not have (a bug in the format plugin, or a tokenizer other than the "
                            "one the format expects). Nothing was cached.")
        t1 = time.perf_counter()
        stats["seconds"] = round(t1 - t0, 3)  # updated below, once written
        path = cache.store(root, key, key_inputs, train, eval_ds, report, stats, origins)
        cache.update_stats(path, write_seconds=round(time.perf_counter() - t1, 3),
                           seconds=round(time.perf_counter() - t0, 3))
        found = cache.load(root, key)
        assert found is not None, path
        data = _from_cache(found, cfg, check_strict=False)
        data.stats["cache"] = "built"
        log_report(report, stats, path)
        return data


def _prepare_streamed(ctx: Context, tokenizer: Any) -> PreparedData:
    """A streamed training set (``ft.engine.data_stream``: read, tokenized and packed as training consumes it) and
    the ``test_datasets``, read, tokenized and packed whole as a cached build does; neither is cached."""
    from ft.engine.data_stream import streamed_train
    from ft.engine.data_tokenize import Samples

    cfg, packing = ctx.cfg, _packing_active(ctx)
    train = streamed_train(ctx, tokenizer, packing)
    eval_ds, report = None, build_report([], 0)
    if cfg.test_datasets:
        jobs = _read(ctx, tokenizer, groups=("test_datasets",))
        _tokenize(cfg, jobs, ctx.method)
        report, _per_entry = _account(cfg, jobs)
        if report["dropped_total"]:
            log.info("evaluation rows dropped:\n%s", report_text(report))
        samples = Samples.concat([job.result.samples for job in jobs])
        if not samples.count:
            raise DataError("no evaluation samples are left after reading and tokenizing test_datasets:\n"
                            + report_text(report))
        eval_ds = samples.to_dataset()
        problem = token_id_problem(eval_ds, tokenizer, "eval ")
        if problem is not None:
            raise DataError(f"the evaluation data has {problem}: a bug in the format plugin, or another tokenizer.")
        if packing and cfg.eval_sample_packing is not False:
            eval_ds = ctx.pm.call("ft_pack", cfg=cfg, dataset=eval_ds, method=ctx.method) or eval_ds
    stats = {"streaming": True, "packed": packing, "sequence_len": cfg.sequence_len, "cache": "none (streamed)",
             "eval_samples": len(eval_ds) if eval_ds is not None else 0}
    return PreparedData(train, eval_ds, packing, report, stats, cache_dir="")


def token_id_problem(dataset: Any, tokenizer: Any, what: str = "") -> str | None:
    """What is wrong with the token ids of ``dataset`` for ``tokenizer`` (None when every id of every token
    column is in ``0 .. len(tokenizer) - 1``, labels may also be -100). One vectorised pass per column."""
    if dataset is None or len(dataset) == 0:
        return None
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from ft.engine.columns import is_token_column

    vocab = len(tokenizer)
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    for column in table.column_names:
        if not is_token_column(column):
            continue
        ignore = None if column.endswith("input_ids") else IGNORE_INDEX  # labels may be -100
        lists = table.column(column).combine_chunks()
        flat = pc.list_flatten(lists)
        checked = flat if ignore is None else pc.filter(flat, pc.not_equal(flat, pa.scalar(ignore, flat.type)))
        if len(checked) == 0:
            continue
        low, high = pc.min_max(checked).values()
        if low.as_py() >= 0 and high.as_py() < vocab:
            continue
        values = flat.to_numpy(zero_copy_only=False)
        bad = (values < 0) | (values >= vocab)
        if ignore is not None:
            bad &= values != ignore
        first = int(np.argmax(bad))
        offsets = lists.offsets.to_numpy(zero_copy_only=False)
        sample = int(np.searchsorted(offsets, first, side="right")) - 1
        return (f"token id {int(values[first])} in {column} of {what}sample {sample} (and {int(bad.sum()) - 1} more), "
                f"but the tokenizer has {vocab} tokens (ids 0-{vocab - 1})")
    return None


def _packing_active(ctx: Context) -> bool:
    return bool(ctx.pm.implementers("ft_pack"))


def _from_cache(found: dict[str, Any], cfg: Any, check_strict: bool = True) -> PreparedData:
    report, stats = found["report"], dict(found["stats"])
    if check_strict and cfg.strict and report.get("dropped_total"):
        raise DataError(strict_message(report))
    stats.setdefault("cache", "hit")
    return PreparedData(found["train"], found["eval"], bool(stats.get("packed")), report, stats, found["path"])


# -- building ---------------------------------------------------------------------------------


@dataclass
class _Job:
    """One dataset entry on its way through the build: where it is, its rows, its tokenize."""

    group: str  # "datasets" or "test_datasets"
    entry: Any
    raw: RawRows
    tokenize: Any
    plugin: str = ""  # the plugin that registered the entry's format (for messages)
    result: Any = None  # ft.engine.data_tokenize.EntryResult, once tokenized


def _build(ctx: Context, tokenizer: Any, packing: bool) -> tuple[dict, dict, Any, Any, SampleOrigins]:
    """Read, tokenize, account for drops, assemble train/eval, pack: the steps of a cache miss."""
    from ft.engine.columns import is_labels_column

    cfg = ctx.cfg
    t0 = time.perf_counter()
    jobs = _read(ctx, tokenizer)
    t1 = time.perf_counter()
    _tokenize(cfg, jobs, ctx.method)
    t2 = time.perf_counter()
    report, per_entry = _account(cfg, jobs)
    train, eval_samples, mixing = _assemble(cfg, jobs, report)
    trained = int(train.trained_tokens())
    if trained == 0 and any(is_labels_column(c) for c in ctx.method.columns):
        formats = ", ".join(f"'{j.entry.type}' (plugin '{j.plugin}')" for j in jobs if j.group == "datasets")
        raise DataError(f"the training data has {train.count} samples but not one trained token: method "
                        f"'{ctx.method.name}' learns from its labels, and every label is -100. The format(s) {formats} "
                        "masked everything (a bug in the format plugin, or train_on_... settings that leave nothing); "
                        "`ft preprocess --debug 3` shows the labels. Nothing was cached.")
    train_ds = train.to_dataset()
    eval_ds = eval_samples.to_dataset() if eval_samples is not None and eval_samples.count else None
    stats: dict[str, Any] = {
        "rows": report["rows_read"],
        "samples": int(train.count),
        "eval_samples": int(eval_samples.count) if eval_samples is not None else 0,
        "tokens": int(train.lengths.sum()),
        "trained_tokens": trained,
        "dropped": report["dropped_total"],
        "truncated": sum(e["truncated"] for e in per_entry),
        "packed": False,
        "sequence_len": cfg.sequence_len,
        "read_seconds": round(t1 - t0, 3),
        "tokenize_seconds": round(t2 - t1, 3),
        "entries": per_entry,
        "mixing": mixing,
        "assemble_seconds": round(time.perf_counter() - t2, 3),
    }
    if packing:
        train_ds, eval_ds = _pack(ctx, train_ds, eval_ds, stats)
    origins = SampleOrigins.of([job.raw for job in jobs], train, eval_samples, packed=bool(stats["packed"]),
                               eval_packed="eval_bins" in stats)
    return report, stats, train_ds, eval_ds, origins


def _read(ctx: Context, tokenizer: Any, groups: Sequence[str] = ("datasets", "test_datasets")) -> list[_Job]:
    """Each entry's rows (``ft_load_dataset``) and its format's tokenize (``build``), in config order."""
    cfg, jobs = ctx.cfg, []
    for group in groups:
        for i, entry in enumerate(getattr(cfg, group) or []):
            raw = ctx.pm.call("ft_load_dataset", cfg=cfg, entry=entry)
            if raw is None:
                raise DataError(f"{cfg.where(group, i, 'path')}: no active plugin can read '{entry.path}'. "
                                "Is the 'sources' plugin blocked, or does this source need a plugin? See `ft plugins`.")
            registered = ctx.formats.get(entry.type, cfg.where(group, i, "type"))
            jobs.append(_Job(group, entry, raw, registered.value.build(cfg, entry, tokenizer), registered.plugin))
    return jobs


def _tokenize(cfg: Any, jobs: list[_Job], method: Any) -> None:
    from ft.engine.data_tokenize import tokenize_entries

    results = tokenize_entries(
        [(job.raw, job.tokenize, job.entry.type) for job in jobs],
        sequence_len=cfg.sequence_len,
        excess_length=cfg.excess_length,
        num_proc=cfg.dataset_num_proc or _cpu_count(),
        columns=method.columns,
        method=method.name,
        plugins=[job.plugin for job in jobs],
    )
    for job, result in zip(jobs, results, strict=True):
        job.result = result


def _account(cfg: Any, jobs: list[_Job]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The drop report and per-entry figures; ``excess_length: error`` and ``strict`` stop here."""
    drops: list[Drop] = []
    notes: list[Drop] = []
    rows_read = 0
    per_entry = []
    for job in jobs:
        raw, res = job.raw, job.result
        if len(raw) + len(raw.dropped) == 0:
            log.warning("%s: %s has no rows (an empty file?): this entry adds nothing",
                        entry_where(cfg, job.entry, "path"), raw.source)
        drops.extend(raw.dropped)
        drops.extend(res.drops)
        notes.extend(res.notes)
        rows_read += len(raw) + len(raw.dropped)
        per_entry.append({
            "path": job.entry.path, "type": job.entry.type, "group": job.group,
            "rows_read": len(raw) + len(raw.dropped), "samples": int(res.samples.count),
            "dropped": len(raw.dropped) + len(res.drops), "truncated": res.truncated, "blank_lines": raw.blank_lines,
        })
    too_long = [d for d in drops if d.reason == TOO_LONG]
    if cfg.excess_length == "error" and too_long:
        raise DataError(
            f"{len(too_long)} sample(s) are longer than sequence_len={cfg.sequence_len} "
            f"({cfg.where('excess_length')}: error):\n" + examples(too_long, 10)
            + "\nRaise sequence_len, or set excess_length: drop or truncate."
        )
    report = build_report(drops, rows_read, notes, truncated=sum(e["truncated"] for e in per_entry))
    if cfg.strict and drops:
        raise DataError(strict_message(report))
    return report, per_entry


def _assemble(cfg: Any, jobs: list[_Job], report: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Concatenate the entries, shuffle with the seed (whole rows), split off the eval part, mix by weight."""
    import numpy as np

    from ft.engine.data_tokenize import Samples

    train = Samples.concat([job.result.samples for job in jobs if job.group == "datasets"])
    if train.count == 0:
        raise DataError("no training samples are left after reading and tokenizing the datasets.\n"
                        + report_text(report) + "\nSee the reasons above; `ft preprocess --debug 5` shows labels.")
    rng = np.random.default_rng(cfg.seed)
    eval_parts: list[Any] = []
    if cfg.val_set_size:
        train, held_out = _split_eval(train, cfg, rng)
        eval_parts.append(held_out)
    elif cfg.shuffle:
        train = train.take(_group_permutation(train.groups, rng))
    train_jobs = [job for job in jobs if job.group == "datasets"]
    train, mixing = mix_by_weight(train, [j.result.samples for j in train_jobs], [j.entry for j in train_jobs], cfg.seed,
                                  cfg.shuffle)
    eval_parts.extend(job.result.samples for job in jobs if job.group == "test_datasets")
    return train, (Samples.concat(eval_parts) if eval_parts else None), mixing


def _pack(ctx: Context, train_ds: Any, eval_ds: Any, stats: dict[str, Any]) -> tuple[Any, Any]:
    """Pack the training samples (and the eval samples, unless ``eval_sample_packing: false``)."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    packed = ctx.pm.call("ft_pack", cfg=cfg, dataset=train_ds, method=ctx.method)
    if packed is None:
        return train_ds, eval_ds
    stats["packed"] = True
    stats["bins"] = len(packed)
    # a bin holds what one unpacked row could: sequence_len per sequence of the method's rows
    sequences = sum(1 for c in ctx.method.columns if c.endswith("input_ids")) or 1
    stats["bin_tokens"] = sequences * cfg.sequence_len
    stats["packing_efficiency"] = round(stats["tokens"] / (len(packed) * stats["bin_tokens"]), 6)
    if eval_ds is not None and cfg.eval_sample_packing is not False:
        eval_ds = ctx.pm.call("ft_pack", cfg=cfg, dataset=eval_ds, method=ctx.method) or eval_ds
        stats["eval_bins"] = len(eval_ds)
    stats["pack_seconds"] = round(time.perf_counter() - t0, 3)
    return packed, eval_ds


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


# -- mixing datasets by weight --------------------------------------------------------------------


