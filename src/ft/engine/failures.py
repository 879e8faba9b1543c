"""Failures of the machine and the files a run reads and writes, said so the user can act: a full disk, a
damaged safetensors file, a model that cannot be loaded, an object that cannot be pickled."""

from __future__ import annotations

import errno
from typing import Any

from ft.kernel.errors import FtError


def refused_pickle(exc: BaseException | None) -> str | None:
    """What torch's safe loader (``weights_only=True``) refused, if that is what ``exc`` (or what it wraps) is."""
    seen = 0
    while exc is not None and seen < 8:
        text = str(exc)
        if type(exc).__name__ == "UnpicklingError" and "weights only load failed" in text.lower():
            detail = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
            detail = detail.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
            return detail or text.strip().splitlines()[0]
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def load_or_explain(source: str, what: str, load: Any, *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)``; a missing or unreachable source, or pickled weights torch refuses to load,
    becomes one clear error."""
    from pathlib import Path

    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if Path(source).exists() else (
            " It is not a local directory; as a hub id it could not be fetched (check the spelling, your "
            "network, HF_TOKEN for gated models)."
        )
        raise FtError(f"could not load the {what} from '{source}': {first}.{hint}") from exc
    except Exception as exc:
        damaged = damaged_safetensors(source) if type(exc).__name__ == "SafetensorError" else []
        if damaged:
            raise FtError(f"could not load the {what} from '{source}': {'; '.join(damaged)}. The file was cut short "
                          "(a copy or download that did not finish, a full disk); copy or save it again.") from None
        if type(exc).__name__ == "SafetensorError":
            raise FtError(f"could not load the {what} from '{source}': a .safetensors file there is unreadable "
                          f"({exc}); copy or save it again.") from None
        refused = refused_pickle(exc)
        if refused is None:
            raise
        raise FtError(f"could not load the {what} from '{source}': its pickled weights hold an object that torch "
                      f"refuses to load ({refused}; weights_only=True), because loading it could run code. Use "
                      "safetensors weights (model.safetensors), or convert these where you trust them.") from None


def damaged_safetensors(source: Any) -> list[str]:
    """``FILE: why`` for each ``.safetensors`` file at ``source`` (a file or a directory) whose header is unreadable
    or whose size is not what its header says (a truncated copy); reads only the headers."""
    import json
    import struct
    from pathlib import Path

    path = Path(source)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    out = []
    for file in files:
        size = file.stat().st_size
        try:
            with open(file, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                if length > size:
                    raise ValueError(f"its header claims {length:,} bytes")
                header = json.loads(fh.read(length))
            end = max([int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"] or [0])
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
            out.append(f"{file} has no readable safetensors header ({exc or type(exc).__name__})")
            continue
        if size != 8 + length + end:
            out.append(f"{file} is {size:,} bytes but its header describes {8 + length + end:,}")
    return out


class DiskFullError(FtError):
    """A write failed because the disk (or the user's quota) is full; says what was kept and how to go on."""


# What a full disk looks like on the way up: the errno of an OSError, or the text of libraries that drop it
# (torch.save: "unexpected pos"; safetensors: "StorageFull").
_DISK_FULL_ERRNOS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name)}


_DISK_FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded", "unexpected pos",
                   "failed writing file")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it wraps) is a write that failed for lack of space."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if not isinstance(exc, FtError) and any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def disk_full_error(path: Any, writing: str, then: str) -> DiskFullError:
    """``no space left on device at PATH while writing WHAT (N free there). THEN``."""
    import shutil
    from pathlib import Path

    free = ""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f" ({shutil.disk_usage(where).free / 2**20:,.1f} MiB free there)"
    except OSError:
        pass
    return DiskFullError(f"no space left on device at {path} while writing {writing}{free}. {then}")
