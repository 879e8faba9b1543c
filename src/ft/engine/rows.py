"""What a source plugin (``ft_load_dataset``) returns: rows, and where each came from (``file:line``)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ft.kernel.formats import Drop


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
