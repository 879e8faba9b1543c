"""Read dataset rows from local files and directories, the Hugging Face hub, and fsspec URLs.

Local: ``.jsonl``, ``.json`` (JSON lines, a JSON array, or ``{"data": [...]}``), ``.parquet``,
``.csv``/``.tsv``, ``.arrow`` (optionally ``.gz``-compressed for the text formats), a directory
of such files (``data_files`` filters it with globs), or a directory written by
``datasets.save_to_disk``. JSON lines are read here rather than by ``datasets``' JSON loader,
which stops at a bad line without naming it: each malformed line is reported with its file and
line number and every other line is kept.

Remote: ``s3://``, ``gs://``, ``hf://`` ... through fsspec when its backend is installed (s3fs,
gcsfs); anything else that is not a local path is loaded as a hub dataset id with
``datasets.load_dataset`` (needs internet, or a warm hub cache with ``HF_HUB_OFFLINE=1``).

``ft_data_fingerprint`` hashes local file contents (remote: ETag / size / mtime; hub: the
resolved commit) so the prepared-data cache notices an edited file.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import os
from array import array
from pathlib import Path
from typing import Any

from ft import hookimpl
from ft.api import DataError, MissingDependencyError, Plugin, redact_text

PLUGIN = Plugin(essential=True)  # essential: ft cannot read data without it

EXTENSIONS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
              ".tsv": "csv", ".arrow": "arrow"}
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


@hookimpl(trylast=True)
def ft_load_dataset(cfg, entry):
    """Rows of one dataset entry, with file:line origins and malformed rows reported."""
    from ft.api import RawRows

    path = entry.path
    where = _where(cfg, entry)
    if _is_url(path):
        return _load_url(path, entry, where)
    local = _local_path(cfg, path)
    if local is not None:
        if local.is_dir():
            return _load_dir(local, entry, where)
        parts, dropped, blank = _read_file(local, entry.ds_type, where)
        return RawRows(str(local), parts, dropped, blank)
    if _looks_like_file(path):
        raise DataError(f"{where}: file '{path}' not found (looked in {os.getcwd()}"
                        + (f" and next to {cfg.source}" if cfg.source else "") + "). Check the path.")
    return _load_hub(path, entry, where)


@hookimpl
def ft_data_fingerprint(cfg, entry):
    """Content hash of local files; ETag/size/mtime for URLs; the commit for hub datasets."""
    from ft.api import file_digest

    path = entry.path
    if _is_url(path):
        fs, root = _url_fs(path, _where(cfg, entry))
        files = _url_files(fs, root, entry)
        return "url:" + json.dumps([[f, _remote_stamp(fs, f)] for f in files], default=str)
    local = _local_path(cfg, path)
    if local is not None:
        files = _dir_files(local, entry.data_files, saved=_is_saved_dataset(local)) if local.is_dir() else [local]
        return "files:" + json.dumps([[str(f.relative_to(local)) if local.is_dir() else f.name, file_digest(f)]
                                      for f in files])
    return "hub:" + json.dumps([path, entry.name, entry.split, entry.revision, entry.data_files, _hub_commit(entry)])


# -- locating ---------------------------------------------------------------------------------


def _where(cfg: Any, entry: Any) -> str:
    for group in ("datasets", "test_datasets"):
        for i, e in enumerate(getattr(cfg, group) or []):
            if e is entry:
                return cfg.where(group, i, "path")
    return f"dataset '{entry.path}'"


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local_path(cfg: Any, path: str) -> Path | None:
    from ft.api import resolve_path

    if path.startswith("file://"):
        path = path[len("file://"):]
    p = Path(resolve_path(cfg, path))
    return p if p.exists() else None


def _looks_like_file(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return (Path(name).suffix.lower() in EXTENSIONS or path.startswith(("./", "../", "/", "~"))
            or os.sep in path and path.count("/") > 1)


def _file_kind(name: str, ds_type: str | None, where: str) -> tuple[str, bool]:
    """(kind, gzipped) of a file from ``ds_type`` or its extension."""
    gz = name.endswith(".gz")
    base = name[:-3] if gz else name
    if ds_type:
        kind = {"jsonl": "json"}.get(ds_type, ds_type)
        if kind not in ("json", "parquet", "csv", "arrow"):
            raise DataError(f"{where}: ds_type '{ds_type}' is not one of json, jsonl, parquet, csv, arrow.")
        return kind, gz
    ext = os.path.splitext(base)[1].lower()
    if ext not in EXTENSIONS:
        raise DataError(f"{where}: cannot tell the file type of '{name}' from its extension; "
                        "set ds_type: json, parquet, csv or arrow on this dataset entry.")
    return EXTENSIONS[ext], gz


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in SAVED_DATASET_MARKERS)


def _dir_files(root: Path, data_files: Any, saved: bool = False) -> list[Path]:
    if saved:
        return sorted(p for p in root.rglob("*") if p.is_file())
    patterns = [data_files] if isinstance(data_files, str) else list(data_files or [])
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        rel = str(p.relative_to(root))
        if patterns:
            if any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(p.name, pat) for pat in patterns):
                out.append(p)
        elif os.path.splitext(p.name[:-3] if p.name.endswith(".gz") else p.name)[1].lower() in EXTENSIONS:
            out.append(p)
    return out


# -- reading ------------------------------------------------------------------------------------


def _load_dir(root: Path, entry: Any, where: str):
    from ft.api import RawRows, RowPart

    if _is_saved_dataset(root):
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(root))
        if isinstance(ds, DatasetDict):
            if entry.split not in ds:
                raise DataError(f"{where}: split '{entry.split}' is not in {root} (it has: {', '.join(ds)}). "
                                "Set split: on this dataset entry.")
            ds = ds[entry.split]
        return RawRows(str(root), [RowPart(ds.with_format("arrow")[:], str(root))])
    files = _dir_files(root, entry.data_files)
    if not files:
        what = f"matching {entry.data_files!r}" if entry.data_files else f"with a data extension ({', '.join(EXTENSIONS)})"
        raise DataError(f"{where}: directory '{root}' has no files {what}.")
    parts, dropped, blank = [], [], 0
    for f in files:
        p, d, b = _read_file(f, entry.ds_type, where)
        parts += p
        dropped += d
        blank += b
    return RawRows(str(root), parts, dropped, blank)


def _read_file(path: Path, ds_type: str | None, where: str) -> tuple[list, list, int]:
    kind, gz = _file_kind(path.name, ds_type, where)
    if kind in ("json", "csv"):
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            return _parse_text(fh, kind, str(path), path.name, where)
    return _parse_binary(str(path), kind, str(path), where)


def _parse_text(fh: Any, kind: str, label: str, name: str, where: str) -> tuple[list, list, int]:
    if kind == "json":
        return read_json(fh, label, json_lines_only=name.endswith((".jsonl", ".jsonl.gz", ".ndjson")))
    return _read_csv(fh.read(), label, delimiter="\t" if ".tsv" in name else ",", where=where)


def _parse_binary(source: Any, kind: str, label: str, where: str) -> tuple[list, list, int]:
    import pyarrow as pa

    from ft.api import RowPart

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(source)
        elif kind == "arrow":
            table = _read_arrow(source)
        else:  # pragma: no cover - guarded by _file_kind
            raise DataError(f"{where}: unsupported file type {kind}")
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{label}: cannot read this {kind} file: {exc}") from None
    return [RowPart(table, label)], [], 0


def _read_arrow(source: Any) -> Any:
    import pyarrow as pa

    data = source if not isinstance(source, str) else pa.memory_map(source)
    try:
        return pa.ipc.open_stream(data).read_all()
    except pa.ArrowInvalid:
        if isinstance(source, str):
            data = pa.memory_map(source)
        else:
            source.seek(0)
        return pa.ipc.open_file(data).read_all()


def read_json(fh: Any, label: str, json_lines_only: bool = False) -> tuple[list, list, int]:
    """Rows of a JSON-lines file (or a JSON array / ``{"key": [rows]}`` document) from a binary file.

    JSON lines are parsed one line at a time (the file is never held in memory whole).
    Returns ``(parts, dropped, blank_lines)``: each malformed line is a ``Drop`` naming
    ``file:line``; every good line is kept.
    """
    from ft.api import MALFORMED, Drop, RowPart

    loads = _json_loads()
    if not json_lines_only:
        doc = _json_document(fh, loads)
        if doc is not None:
            if isinstance(doc, list):
                return _rows_of_document(doc, label)
            lists = [v for v in doc.values() if isinstance(v, list)]
            if len(doc) == 1 and lists:
                return _rows_of_document(lists[0], label)
            return [RowPart([doc], label, array("I", [1]))], [], 0
    rows: list[dict] = []
    lines = array("I")
    dropped = []
    blank = 0
    for lineno, line in enumerate(fh, 1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            blank += 1
            continue
        try:
            obj = loads(line)
        except ValueError as exc:
            dropped.append(Drop(MALFORMED, f"{label}:{lineno}", _json_problem(line, exc)))
            continue
        if not isinstance(obj, dict):
            dropped.append(Drop(MALFORMED, f"{label}:{lineno}", f"expected a JSON object, got {type(obj).__name__}"))
            continue
        rows.append(obj)
        lines.append(lineno)
    return [RowPart(rows, label, lines)], dropped, blank


def _json_document(fh: Any, loads: Any) -> Any:
    """A whole-file JSON array or object, or None (then the file is JSON lines); rewinds ``fh``."""
    head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    fh.seek(0)
    if head not in (b"[", b"{"):
        return None
    if head == b"{":  # one object per line is JSON lines; a document spans lines
        try:
            first = loads(fh.readline())
        except ValueError:
            first = None
        more = bool(fh.read(1 << 16).strip())
        fh.seek(0)
        if isinstance(first, dict) and more:
            return None
    try:
        doc = json.loads(fh.read())
    except ValueError:
        doc = None  # broken: the line reader says which line
    fh.seek(0)
    return doc if isinstance(doc, (list, dict)) else None


def _json_problem(line: bytes, exc: Exception) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"not valid UTF-8 ({bad.reason} at byte {bad.start})"
    return f"invalid JSON: {_short(exc)}"


def _rows_of_document(items: list, label: str) -> tuple[list, list, int]:
    from ft.api import MALFORMED, Drop, RowPart

    rows, numbers, dropped = [], array("I"), []
    for i, item in enumerate(items, 1):
        if isinstance(item, dict):
            rows.append(item)
            numbers.append(i)
        else:
            dropped.append(Drop(MALFORMED, f"{label}: item {i}", f"expected a JSON object, got {type(item).__name__}"))
    return [RowPart(rows, label, numbers, unit="item")], dropped, 0


def _json_loads():
    try:
        import orjson

        return orjson.loads
    except ImportError:
        return json.loads


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 160 else text[:157] + "..."


def _read_csv(data: bytes, label: str, delimiter: str, where: str) -> tuple[list, list, int]:
    """Rows of a CSV/TSV file as dicts of strings (CSV has no types: ``4`` is text an answer may be), each
    with the file line it starts on; a row with the wrong number of cells is dropped naming its line."""
    import csv
    import io

    from ft.api import MALFORMED, Drop, RowPart

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{label}:{line}: this CSV file is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                        "save it as UTF-8.") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[dict[str, str]] = []
    lines, dropped, blank = array("I"), [], 0
    try:
        header = next(reader, None)
        start = reader.line_num + 1
        for record in reader:
            line, start = start, reader.line_num + 1
            if not record:
                blank += 1
            elif header is None or len(record) != len(header):
                dropped.append(Drop(MALFORMED, f"{label}:{line}",
                                    f"expected {len(header or [])} columns, got {len(record)}"))
            else:
                rows.append(dict(zip(header, record, strict=True)))
                lines.append(line)
    except csv.Error as exc:
        raise DataError(f"{label}:{reader.line_num}: cannot read this CSV file: {exc}") from None
    return [RowPart(rows, label, lines)], dropped, blank


# -- remote sources ---------------------------------------------------------------------------


def _url_fs(url: str, where: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise MissingDependencyError(f"{where}: reading '{url}' needs fsspec: pip install fsspec") from None
    scheme = url.split("://", 1)[0].lower()
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        pkg = BACKENDS.get(scheme, f"the fsspec backend for {scheme}://")
        raise MissingDependencyError(f"{where}: reading {scheme}:// URLs needs {pkg}: pip install {pkg} ({exc})") from None
    return fs, path


def _url_files(fs: Any, root: str, entry: Any) -> list[str]:
    try:
        is_dir = fs.isdir(root)
    except Exception as exc:  # noqa: BLE001 - network and auth errors differ per backend
        raise DataError(f"cannot reach '{redact_text(entry.path)}': {type(exc).__name__}: "
                        f"{redact_text(str(exc))}") from None
    if not is_dir:
        return [root]
    patterns = [entry.data_files] if isinstance(entry.data_files, str) else list(entry.data_files or [])
    files = []
    for f in sorted(fs.find(root)):
        rel = f[len(root):].lstrip("/")
        name = rel.rsplit("/", 1)[-1]
        if patterns:
            if any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns):
                files.append(f)
        elif os.path.splitext(name[:-3] if name.endswith(".gz") else name)[1].lower() in EXTENSIONS:
            files.append(f)
    return files


def _load_url(url: str, entry: Any, where: str):
    from ft.api import RawRows

    fs, root = _url_fs(url, where)
    files = _url_files(fs, root, entry)
    if not files:
        raise DataError(f"{where}: no data files found under '{redact_text(url)}'.")
    scheme = url.split("://", 1)[0]
    parts, dropped, blank = [], [], 0
    for f in files:
        label = redact_text(f if "://" in f else f"{scheme}://{f}")  # drop reports never show credentials
        kind, gz = _file_kind(f.rsplit("/", 1)[-1], entry.ds_type, where)
        try:
            with fs.open(f, "rb") as raw_fh:
                if kind in ("json", "csv"):
                    fh = gzip.open(raw_fh, "rb") if gz else raw_fh
                    p, d, b = _parse_text(fh, kind, label, f, where)
                else:
                    fh = raw_fh
                    import pyarrow as pa

                    p, d, b = _parse_binary(pa.BufferReader(fh.read()), kind, label, where)
        except (OSError, PermissionError) as exc:
            raise DataError(f"{where}: cannot read '{label}': {redact_text(str(exc))}") from None
        parts += p
        dropped += d
        blank += b
    return RawRows(url, parts, dropped, blank)


def _remote_stamp(fs: Any, path: str) -> Any:
    try:
        info = fs.info(path)
    except Exception:  # noqa: BLE001
        return None
    return {k: info.get(k) for k in ("ETag", "etag", "md5Hash", "crc32c", "size", "LastModified", "mtime", "updated")
            if info.get(k) is not None}


def _load_hub(path: str, entry: Any, where: str):
    from ft.api import RawRows, RowPart

    try:
        from datasets import load_dataset

        ds = load_dataset(path, name=entry.name, split=entry.split, revision=entry.revision,
                          data_files=entry.data_files)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, auth, bad split: all end here
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = (" The hub is switched off here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): download it first, or use a local file."
                if offline else " Check the id, the split/name, your internet connection and `huggingface-cli login`.")
        raise DataError(f"{where}: '{path}' is neither a local file nor a readable hub dataset: "
                        f"{type(exc).__name__}: {_short(exc)}.{hint}") from None
    label = f"{path}[{entry.split}]"
    return RawRows(label, [RowPart(ds.with_format("arrow")[:], label)])


def _hub_commit(entry: Any) -> str | None:
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(entry.path, revision=entry.revision, timeout=10).sha
    except Exception:  # noqa: BLE001 - no network: the key falls back to id + revision
        return None
