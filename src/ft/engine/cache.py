"""The prepared-dataset cache: a content key, a file lock, and atomic writes.

Layout of ``dataset_prepared_path``::

    <key>/train/        the training dataset (``datasets.save_to_disk``; loaded memory-mapped)
    <key>/eval/         the eval dataset, when there is one
    <key>/report.json   rows dropped, per reason, with file:line examples
    <key>/origins.*     the file:line each sample came from (``ft preprocess --debug``)
    <key>/stats.json    rows, samples, tokens, packing efficiency, seconds
    <key>/key.json      what went into the key (to see why a cache was rebuilt), secrets redacted
    <key>/manifest.json size and xxh3 checksum of every file above (checked on every load), and
                    of files a run adds later (``reference/``: checked when they are read)
    <key>/reference/    precomputed reference log-probabilities of preference methods
    <key>.lock          held while one process builds; the others wait, then load

The key hashes everything that changes the prepared rows: the data files' contents (through
``ft_data_fingerprint``), files named by dataset options (e.g. a jinja template file), the
tokenizer (vocabulary, added tokens, chat template), the config keys that matter (of the method's
section, the fields marked ``SHAPES_DATA``), and the
version and source of every plugin on the data path. A build is written to a temporary
directory and renamed into place, so a crash never leaves a half-written cache behind. Every load
checks the files against the manifest's checksums (xxh3, at disk-read speed): a damaged cache is
rebuilt with a warning, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from ft.engine.failures import disk_full_error, is_disk_full
from ft.kernel.errors import DataError

log = logging.getLogger("ft.data")

# Bump when the layout or meaning of prepared data changes.
CACHE_FORMAT = 2  # 2: manifest.json with a checksum of every file
# Config keys that change the prepared rows (datasets entries are added separately).
KEY_CONFIG = ("sequence_len", "excess_length", "train_on_inputs", "special_tokens", "tokens", "val_set_size",
              "seed", "shuffle", "chat_template", "eval_sample_packing")
# A plugin implementing one of these is on the data path: its version and source join the key.
DATA_HOOKS = frozenset({"ft_load_dataset", "ft_data_fingerprint", "ft_pack"})
# ft's own modules on the data path.
CORE_DATA_MODULES = ("ft.engine.data", "ft.engine.data_tokenize", "ft.kernel.formats", "ft.engine.cache")


def prepared_root(cfg: Any) -> Path:
    return Path(cfg.dataset_prepared_path).expanduser()


def cache_key(ctx: Any, tokenizer: Any, packing: bool) -> tuple[str, dict[str, Any]]:
    """The cache key of this config + data + tokenizer, and the inputs it was made from."""
    cfg, pm = ctx.cfg, ctx.pm
    entries: dict[str, list[Any]] = {}
    for group in ("datasets", "test_datasets"):
        entries[group] = []
        for entry in getattr(cfg, group) or []:
            fingerprints = {p: fp for p, fp in pm.each("ft_data_fingerprint", cfg=cfg, entry=entry) if fp is not None}
            fmt = ctx.formats.get(entry.type).value if entry.type in ctx.formats else None
            entries[group].append({
                "entry": entry.model_dump(mode="json"),
                # the code that tokenizes this entry (a format plugin often keeps it in another module)
                "format_source": sorted({str(_source_hash(f)) for f in (fmt.build, fmt.options)}) if fmt else None,
                "fingerprints": fingerprints,
                "option_files": _option_files(cfg, entry),
            })
    # Plugins that read, fingerprint or pack data, and the owners of the formats in use (not
    # every installed format: installing an unrelated format plugin must not rebuild caches).
    owners = {ctx.formats.get(e.type).plugin for g in ("datasets", "test_datasets")
              for e in getattr(cfg, g) or [] if e.type in ctx.formats}
    plugins = {}
    for name, info in sorted(pm.infos.items()):
        if info.status in ("active", "essential") and (DATA_HOOKS & set(info.hooks) or name in owners):
            plugins[name] = {"version": info.version, "source": _source_hash(pm.pm.get_plugin(name))}
    inputs = {
        "cache_format": CACHE_FORMAT,
        "ft": {m: _source_hash(importlib.import_module(m)) for m in CORE_DATA_MODULES},
        "entries": entries,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "config": {k: _plain(getattr(cfg, k)) for k in KEY_CONFIG},
        "packing": {"selected": packing, "sections": _packing_sections(ctx) if packing else {}},
        "method": _method_inputs(ctx),
        "plugins": plugins,
    }
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], inputs


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides token ids: vocabulary/merges/normalizer, added tokens, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    meta = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": getattr(tokenizer, "special_tokens_map", None),
        "added_tokens": [str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()],
        "length": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


FULL_DIGEST_BYTES = 64 << 20  # sampled digests: files up to this size are still hashed whole
SAMPLE_BYTES = 1 << 20  # larger ones: SAMPLES evenly spread blocks of this size (weights, optimizer states)
SAMPLES = 16


def _xxhash() -> Any:
    try:
        import xxhash

        return xxhash
    except ImportError:  # pragma: no cover - xxhash comes with ft[train]
        return None


def file_digest(path: str | os.PathLike, *, sampled: bool = False, size: int | None = None) -> str:
    """A digest of a file's content, in one of two forms kept as they are on disk (manifests written by
    earlier runs are checked against them).

    ``sampled=False``: content identity (cache keys, data fingerprints, the prepared cache's manifest):
    xxh3-128 of every byte, as hex (sha256 without xxhash). An edit anywhere in the file changes it.

    ``sampled=True``: a damage check beside a size check (checkpoint manifests: files of many GB are
    checked at every resume): ``xxh3:`` + xxh3-64 of a file up to ``FULL_DIGEST_BYTES``, else
    ``sampled-xxh3:`` + xxh3-64 of ``SAMPLES`` blocks spread over it (blake2b without xxhash). It misses an
    edit between the blocks that keeps the size: never a content key. ``size``: the file's, when known."""
    xxhash = _xxhash()
    if not sampled:
        h: Any = xxhash.xxh3_128() if xxhash else hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        return h.hexdigest()
    size = os.stat(path).st_size if size is None else size
    h, name = (xxhash.xxh3_64(), "xxh3") if xxhash else (hashlib.blake2b(digest_size=16), "blake2b")
    with open(path, "rb") as fh:
        if size <= FULL_DIGEST_BYTES:
            while block := fh.read(4 << 20):
                h.update(block)
        else:
            name = f"sampled-{name}"
            for i in range(SAMPLES):
                fh.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(fh.read(SAMPLE_BYTES))
    return f"{name}:{h.hexdigest()}"


def _option_files(cfg: Any, entry: Any) -> dict[str, str]:
    """Content hashes of files named by an entry's options (other than ``path``): a template file
    edited in place must rebuild the cache too."""
    from ft.kernel.context import resolve_path

    out = {}
    for key, value in entry:
        if key == "path" or not isinstance(value, str) or "\n" in value or len(value) > 1024:
            continue
        try:
            p = resolve_path(cfg, value)
            if os.path.isfile(p):
                out[key] = file_digest(p)
        except OSError:
            continue
    return out


def _source_hash(obj: Any) -> str | None:
    """Hash of the source file of a module, or of the module defining a class/function/instance."""
    if obj is not None and not inspect.ismodule(obj):
        obj = inspect.getmodule(obj if inspect.isclass(obj) or inspect.isroutine(obj) else type(obj))
    path = getattr(obj, "__file__", None)
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def _method_inputs(ctx: Any) -> dict[str, Any]:
    """The method shapes the rows: its columns, and the fields of its section marked ``SHAPES_DATA`` (prompt
    limits ...); its other settings (``dpo.beta``, GRPO's rewards) do not, so changing them reuses the data."""
    from ft.kernel.config import data_shaping_values

    method = ctx.method
    entry = ctx.registries.methods.get(method.name)
    section = ctx.cfg.section(method.section_name)
    return {"name": method.name, "columns": list(method.columns), "plugin": entry.plugin,
            "section": data_shaping_values(section)}


def _packing_sections(ctx: Any) -> dict[str, Any]:
    """Config sections of the plugins that pack (their options change the bins)."""
    out = {}
    for plugin in ctx.pm.implementers("ft_pack"):
        section = ctx.cfg.section(plugin)
        out[plugin] = section.model_dump(mode="json") if section is not None else None
    return out


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


# -- lock, load, store ------------------------------------------------------------------------


RANK0_HEAD_START_S = 30.0


@contextlib.contextmanager
def build_lock(root: Path, key: str) -> Iterator[None]:
    """Hold ``<root>/<key>.lock``: one process builds; the others wait here, then load the cache.

    Local rank 0 builds: other local ranks (``LOCAL_RANK`` != 0, set by torchrun) first give
    it a head start, waiting until it holds the lock or the cache appears (at most
    ``RANK0_HEAD_START_S`` seconds, after which whoever takes the lock builds). Per node,
    because each node may have its own disk.
    """
    from filelock import FileLock, Timeout

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"dataset_prepared_path: cannot create {root}: {exc}. Choose a writable directory.") from None
    lock = FileLock(str(root / f"{key}.lock"))
    if os.environ.get("LOCAL_RANK", "0") != "0":
        _wait_for_rank0(lock, root / key)
    try:
        lock.acquire(timeout=2)
    except Timeout:
        log.info("another process is preparing %s; waiting for it to finish", root / key)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _wait_for_rank0(lock: Any, done: Path) -> None:
    from filelock import Timeout

    deadline = time.monotonic() + RANK0_HEAD_START_S
    while time.monotonic() < deadline and not (done / "stats.json").is_file():
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return  # rank 0 (or another process) is building: wait for it on the lock
        lock.release()
        time.sleep(0.2)


def load(root: Path, key: str) -> dict[str, Any] | None:
    """The cached datasets, report and stats, or None when there is no complete cache."""
    path = root / key
    if not (path / "stats.json").is_file():
        return None
    from datasets import load_from_disk

    problems = verify_manifest(path)
    if problems:
        log.warning("the prepared data in %s is damaged (%s); rebuilding it", path, "; ".join(problems[:3]))
        shutil.rmtree(path, ignore_errors=True)
        return None
    try:
        with _quiet_datasets():
            train = load_from_disk(str(path / "train"))
            eval_ds = load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
        report = json.loads((path / "report.json").read_text(encoding="utf-8"))
        stats = json.loads((path / "stats.json").read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
        log.warning("the prepared data in %s cannot be read (%s); rebuilding it", path, exc)
        shutil.rmtree(path, ignore_errors=True)
        return None
    return {"train": train, "eval": eval_ds, "report": report, "stats": stats, "path": str(path)}


def store(root: Path, key: str, inputs: dict[str, Any], train: Any, eval_ds: Any,
          report: dict[str, Any], stats: dict[str, Any], origins: Any = None) -> str:
    """Write a build into a temporary directory, then rename it to ``<root>/<key>`` (atomic)."""
    final = root / key
    for stale in root.glob(f".tmp-{key}-*"):  # left by a crashed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        with _quiet_datasets():
            train.save_to_disk(str(tmp / "train"))
            if eval_ds is not None:
                eval_ds.save_to_disk(str(tmp / "eval"))
        (tmp / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        if origins is not None:  # where each sample came from (file:line), for `ft preprocess --debug`
            origins.save(tmp)
        from ft.kernel.redact import redact

        key_text = json.dumps(redact(json.loads(json.dumps(inputs, default=str))), indent=2, sort_keys=True)
        (tmp / "key.json").write_text(key_text, encoding="utf-8")  # what went into the key, secrets redacted
        stats = {**stats, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
        write_manifest(tmp)
        if final.exists():  # only after a damaged cache was half-removed
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise disk_full_error(root, "the prepared data", "Nothing half-written was kept. Free some space there "
                                  "or point dataset_prepared_path at a disk with room, then run the same command "
                                  "again.") from exc
        raise
    return str(final)


def remove(path: str | os.PathLike) -> None:
    """Remove a prepared cache (held under the build lock): it is rebuilt."""
    shutil.rmtree(path, ignore_errors=True)


MANIFEST = "manifest.json"
UNCHECKED = frozenset({MANIFEST, "stats.json"})  # stats.json gets figures after the build (update_stats)


def write_manifest(path: Path, *, name: str = MANIFEST, header: dict[str, Any] | None = None,
                   skip: Collection[str] = UNCHECKED, sampled: bool = False,
                   flush: Callable[[Path], None] | None = None) -> None:
    """Write ``path/name``: ``header`` and the size and ``file_digest`` of every file below ``path`` (but
    ``name`` and ``skip``), under ``files``. The defaults write a prepared cache's ``manifest.json`` (full
    digests; stats.json left out). ``flush`` (fsync) is called on each file before it is measured, and on
    the manifest once written: checkpoints use it, with sampled digests."""
    header = {"format": CACHE_FORMAT} if header is None else header
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel == name or rel in skip:
            continue
        if flush is not None:
            flush(file)
        files[rel] = file_entry(file, sampled=sampled)
    target = path / name
    target.write_text(json.dumps({**header, "files": files}, indent=1) + "\n", encoding="utf-8")
    if flush is not None:
        flush(target)


def verify_manifest(path: Path) -> list[str]:
    """What is wrong with the files of the cache at ``path`` (empty when every checksum matches)."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"its {MANIFEST} cannot be read ({type(exc).__name__})"]
    return [problem for name, want in files.items() if (problem := file_problem(path, name, want))]


def file_problem(path: Path, name: str, want: dict[str, Any], *, sampled: bool = False,
                 changed: str = "changed since it was written") -> str | None:
    """What is wrong with ``path/name`` against its manifest entry ``want`` (None when it is intact):
    missing, another size, or another digest (then ``name`` + ``changed``)."""
    file = path / name
    if not file.is_file():
        return f"{name} is missing"
    size = file.stat().st_size
    if size != want.get("size"):
        return f"{name} has {size} bytes, {want.get('size')} were written"
    if file_digest(file, sampled=sampled, size=size) != want.get("digest"):
        return f"{name} {changed}"
    return None


def file_entry(file: Path, *, sampled: bool = False, size: int | None = None) -> dict[str, Any]:
    """A manifest's entry for ``file``: its size and digest."""
    size = file.stat().st_size if size is None else size
    return {"size": size, "digest": file_digest(file, sampled=sampled, size=size)}


# Files a run adds to a built cache (precomputed reference log-probabilities) are listed under
# ``added`` in its manifest: checked when they are read, each on its own. A damaged one is
# computed again; it never makes the whole prepared dataset be rebuilt.
ADDED = "added"


def record_cache_file(path: str | os.PathLike, name: str) -> None:
    """List ``path/name`` (written after the build, atomically) with its size and checksum in the
    cache's manifest, under the cache's build lock (two runs may add files at once)."""
    from filelock import FileLock

    path = Path(path)
    with FileLock(f"{path}.lock"):
        manifest_file = path / MANIFEST
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        file = path / name
        manifest.setdefault(ADDED, {})[name] = file_entry(file)
        tmp = manifest_file.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            os.replace(tmp, manifest_file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def cache_file_problem(path: str | os.PathLike, name: str) -> str | None:
    """What is wrong with the added file ``path/name`` (None when its checksum matches the manifest's)."""
    path = Path(path)
    try:
        want = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get(ADDED, {}).get(name)
    except (OSError, ValueError, AttributeError) as exc:
        return f"the cache's {MANIFEST} cannot be read ({type(exc).__name__})"
    if not isinstance(want, dict):
        return f"{name} is not listed in the cache's {MANIFEST} (written by an interrupted run, or by hand)"
    return file_problem(path, name, want)


def update_stats(path: str, **values: Any) -> None:
    """Add figures known only after the cache was written (write time)."""
    stats_file = Path(path) / "stats.json"
    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    stats.update(values)
    tmp = stats_file.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(stats, indent=2), encoding="utf-8")
        os.replace(tmp, stats_file)
    except OSError as exc:  # the figures are a nicety: the cache itself is complete
        tmp.unlink(missing_ok=True)
        if not is_disk_full(exc):
            raise
        log.warning("no space left on device at %s to add the write time to stats.json; the cache is complete", path)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Saving the dataset" / "Loading" bars from datasets: ours says what happens."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
