"""Streamed training data: rows read, tokenized and packed as training consumes them, never cached.

A run whose training datasets say ``streaming: true`` (``ft.kernel.config_checks.streaming_problems`` lets
a run stream every training entry or none, and requires ``max_steps``) gets its training rows from
:func:`streamed_train` instead of the prepared-data cache:

1. Each entry is opened with ``datasets.load_dataset(..., streaming=True)`` (:func:`open_stream`): a local
   file or directory (jsonl/json/parquet/csv/arrow/txt, ``.gz`` too), a URL, or a hub id. Nothing is
   downloaded or loaded whole; with several processes each rank reads its own share
   (``datasets.distributed.split_dataset_by_node``), and ``shuffle: true`` shuffles through a buffer of
   ``SHUFFLE_BUFFER_ROWS`` rows with the seed.
2. Rows are taken ``READ_BATCH_ROWS`` at a time and tokenized by the entry's format exactly as a cached
   build does (``ft.engine.data_tokenize.tokenize_entries``: same ``excess_length``, same drops); dropped
   rows are counted and the first of each reason is logged, ``strict: true`` stops at the first one.
3. Samples are packed ``PACK_WINDOW_SAMPLES`` at a time by the selected packing plugin (``ft_pack``: the
   same best-fit-decreasing packer, so a window that holds every sample gives the rows a cached build
   gives); without packing each sample is one row. Several streamed entries alternate batch by batch.

The Trainer receives a ``datasets.IterableDataset`` with one shard per process, which accelerate hands
to each rank (``IterableDataset.shard``); a resumed run skips the batches already trained on by reading
the stream again (the HF Trainer's own resume of an iterable dataset), which gives the same rows as the
stream is deterministic for a seed. Evaluation sets are never streamed; they are read and tokenized
whole (not cached either).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.kernel.errors import DataError

if TYPE_CHECKING:
    from ft.kernel.context import Context

log = logging.getLogger("ft.data")

READ_BATCH_ROWS = 256  # rows tokenized together
PACK_WINDOW_SAMPLES = 2048  # samples packed together (best-fit-decreasing within the window)
SHUFFLE_BUFFER_ROWS = 10_000  # rows in the shuffle buffer (shuffle: true)
STREAM_KINDS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
                ".arrow": "arrow", ".txt": "text"}


def streamed_train(ctx: Context, tokenizer: Any, packing: bool) -> Any:
    """The training rows of ``cfg.datasets`` as a ``datasets.IterableDataset`` of packed (or plain) rows."""
    from datasets import IterableDataset
    from datasets.iterable_dataset import ExamplesIterable

    cfg = ctx.cfg
    if tuple(ctx.method.columns) != ("input_ids", "labels"):
        raise DataError(f"{cfg.where('datasets', 0, 'streaming')}: method '{ctx.method.name}' reads rows of "
                        f"{', '.join(ctx.method.columns)}; streaming serves rows of input_ids and labels only "
                        "(sft and other completion-style methods). Remove streaming: true.")
    streams = [open_stream(cfg, entry, cfg.where("datasets", i, "path")) for i, entry in enumerate(cfg.datasets)]
    world = max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
    names = ", ".join(f"datasets[{i}] ({e.path})" for i, e in enumerate(cfg.datasets))
    log.info("streaming %s: rows are read, tokenized%s as training consumes them; nothing is cached "
             "(dataset_prepared_path is not used for them)%s", names, " and packed" if packing else "",
             f", each of {world} processes reads its own share" if world > 1 else "")
    stream = RowStream(ctx, tokenizer, streams, packing, world)
    # one shard per process (accelerate gives rank r shard r); built from the generator directly, because
    # IterableDataset.from_generator hashes the generator with everything it holds (the tokenizer, the config)
    return IterableDataset(ExamplesIterable(stream.keyed, {"ranks": list(range(world))}))


def open_stream(cfg: Any, entry: Any, where: str) -> Any:
    """``entry`` as a ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``)."""
    from datasets import load_dataset

    from ft.kernel.context import resolve_path

    path = entry.path.removeprefix("file://")
    if "://" in path:  # a URL of a file (fsspec), or a hub id
        files: list[str] | None = [path] if _suffix(path) in STREAM_KINDS else None
        kind = _kind(path, entry.ds_type, where) if files else None
    else:
        local = Path(resolve_path(cfg, path))
        if local.exists():
            found = _local_files(local, entry, where)
            kinds = {_kind(str(f), entry.ds_type, where) for f in found}
            if len(kinds) > 1:
                raise DataError(f"{where}: {local} holds files of several kinds ({', '.join(sorted(kinds))}); a streamed "
                                "entry reads one kind: split it into entries, or filter it with data_files.")
            files, kind = [str(f) for f in found], kinds.pop()
        elif _suffix(path) in STREAM_KINDS or path.startswith(("./", "../", "/", "~")):
            raise DataError(f"{where}: file '{path}' not found (looked in {os.getcwd()}"
                            + (f" and next to {cfg.source}" if cfg.source else "") + "). Check the path.")
        else:
            files, kind = None, None
    try:
        if files is not None:
            return load_dataset(kind, data_files=files, split="train", streaming=True)
        return load_dataset(path, name=entry.name, split=entry.split, revision=entry.revision,
                            data_files=entry.data_files, streaming=True)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, bad split, unreadable file: all end here
        hint = (" The hub is switched off here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): use a local file."
                if files is None and (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"))
                else " Check the path or hub id, the split/name and `huggingface-cli login`.")
        raise DataError(f"{where}: cannot stream '{entry.path}': {type(exc).__name__}: {str(exc)[:300]}.{hint}") from None


def _suffix(name: str) -> str:
    return os.path.splitext(name[:-3] if name.endswith(".gz") else name)[1].lower()


def _kind(name: str, ds_type: str | None, where: str) -> str:
    if ds_type:
        kind = {"jsonl": "json", "txt": "text"}.get(ds_type, ds_type)
        if kind not in set(STREAM_KINDS.values()):
            raise DataError(f"{where}: ds_type '{ds_type}' is not one of json, jsonl, parquet, csv, arrow, text.")
        return kind
    if _suffix(name) not in STREAM_KINDS:
        raise DataError(f"{where}: cannot tell the file type of '{name}' from its extension; set ds_type: json, "
                        "parquet, csv, arrow or text on this dataset entry.")
    return STREAM_KINDS[_suffix(name)]


def _local_files(path: Path, entry: Any, where: str) -> list[Path]:
    if not path.is_dir():
        return [path]
    import fnmatch

    patterns = [entry.data_files] if isinstance(entry.data_files, str) else entry.data_files
    found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if patterns:
        found = [p for p in found if any(fnmatch.fnmatch(str(p.relative_to(path)), pat) for pat in patterns)]
    else:
        found = [p for p in found if _suffix(p.name) in STREAM_KINDS]
    if not found:
        raise DataError(f"{where}: no data files in {path} " + (f"matching {entry.data_files!r}" if patterns else
                        f"with a data extension ({', '.join(STREAM_KINDS)})") + ".")
    return found


class RowStream:
    """The generator behind the Trainer's ``IterableDataset``: ``RowStream(...).rows(r)`` yields rank ``r``'s
    rows (``input_ids``, ``labels`` and, packed, ``position_ids``). Counts what it read in ``rows_read``."""

    def __init__(self, ctx: Context, tokenizer: Any, streams: list[Any], packing: bool, world: int):
        cfg = ctx.cfg
        self.ctx, self.streams, self.packing, self.world = ctx, streams, packing, world
        self.formats = [ctx.formats.get(e.type, cfg.where("datasets", i, "type")) for i, e in enumerate(cfg.datasets)]
        self.tokenizes = [f.value.build(cfg, e, tokenizer) for f, e in zip(self.formats, cfg.datasets, strict=True)]
        self.rows_read = 0
        self.drops: Counter[str] = Counter()

    def keyed(self, ranks: list[int]) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(key, row)`` pairs of the ranks ``ranks`` (what ``datasets``' ``ExamplesIterable`` iterates)."""
        for rank in ranks:
            for k, row in enumerate(self.rows(rank)):
                yield f"{rank}-{k}", row

    def rows(self, rank: int = 0) -> Iterator[dict[str, Any]]:
        """Rank ``rank``'s training rows, window by window."""
        from ft.engine.data_tokenize import Samples

        batches = [self._samples(i, rank) for i in range(len(self.streams))]
        window: list[Any] = []
        for samples in _alternate(batches):
            window.append(samples)
            if sum(s.count for s in window) >= PACK_WINDOW_SAMPLES:
                yield from self._rows_of(Samples.concat(window))
                window = []
        if window:
            yield from self._rows_of(Samples.concat(window))
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.drops.items()) or "none"
        log.info("the streamed data ended after %d rows (dropped: %s)", self.rows_read, dropped)

    def _samples(self, i: int, rank: int) -> Iterator[Any]:
        """Entry ``i``'s tokenized samples, ``READ_BATCH_ROWS`` rows at a time."""
        from datasets.distributed import split_dataset_by_node

        from ft.engine.data_tokenize import tokenize_entries
        from ft.engine.rows import RawRows, RowPart

        cfg, method = self.ctx.cfg, self.ctx.method
        entry = cfg.datasets[i]
        stream = self.streams[i]
        if self.world > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=self.world)
        if cfg.shuffle:
            stream = stream.shuffle(seed=cfg.seed, buffer_size=SHUFFLE_BUFFER_ROWS)
        label = f"{entry.path} (streamed{f', rank {rank}' if self.world > 1 else ''})"
        rows_iter, read = iter(stream), 0
        while True:
            try:
                rows = list(itertools.islice(rows_iter, READ_BATCH_ROWS))
            except Exception as exc:  # noqa: BLE001 - a bad line or a lost connection, named with its entry
                raise DataError(f"{cfg.where('datasets', i, 'path')}: reading the stream failed after {read} rows: "
                                f"{type(exc).__name__}: {str(exc)[:300]}") from None
            if not rows:
                return
            raw = RawRows(label, [RowPart(rows, label, range(read + 1, read + len(rows) + 1), unit="row")])
            read += len(rows)
            self.rows_read += len(rows)
            result = tokenize_entries([(raw, self.tokenizes[i], entry.type)], sequence_len=cfg.sequence_len,
                                      excess_length=cfg.excess_length, num_proc=1, progress=False,
                                      columns=method.columns, method=method.name, plugins=[self.formats[i].plugin])[0]
            self._count_drops(result.drops)
            if result.samples.count:
                yield result.samples

    def _count_drops(self, drops: list[Any]) -> None:
        from ft.engine.data_tokenize import TOO_LONG

        cfg = self.ctx.cfg
        for drop in drops:
            if cfg.excess_length == "error" and drop.reason == TOO_LONG:
                raise DataError(f"{drop.where}: a sample is longer than sequence_len={cfg.sequence_len} "
                                f"({cfg.where('excess_length')}: error): {drop.detail}. Raise sequence_len, or set "
                                "excess_length: drop or truncate.")
            if cfg.strict:
                raise DataError(f"{drop.where}: {drop.reason}: {drop.detail} ({cfg.where('strict')}: true stops at "
                                "the first dropped row).")
            if not self.drops[drop.reason]:
                log.warning("streamed rows are dropped (%s), first at %s: %s; each is counted, the count is logged "
                            "when the stream ends", drop.reason, drop.where, drop.detail)
            self.drops[drop.reason] += 1

    def _rows_of(self, samples: Any) -> Iterator[dict[str, Any]]:
        dataset = samples.to_dataset()
        if self.packing:
            with _quiet("ft.packing"):  # one line per window would flood the log
                dataset = self.ctx.pm.call("ft_pack", cfg=self.ctx.cfg, dataset=dataset, method=self.ctx.method)
        yield from dataset.with_format("arrow")[:].to_pylist()


def _alternate(iterators: list[Iterator[Any]]) -> Iterator[Any]:
    """Items of ``iterators`` in turn, one from each, until all are exhausted."""
    live = list(iterators)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)
