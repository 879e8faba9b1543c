"""Reading a config file: YAML with the line of every key (for errors that say file:line), size and depth limits,
and ``--set key=value`` overrides."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ft.kernel.errors import ConfigError, FtError


@dataclass
class RawConfig:
    data: dict[str, Any]
    lines: dict[tuple, int]
    source: str | None


# Limits on what a config may be, checked before it is parsed: a real config is a few KB, nests a few levels and
# reuses an anchor or two. A 50 MB file took minutes, a "billion laughs" alias bomb grew without bound, and deep
# nesting ran out of Python's stack.
MAX_CONFIG_BYTES = 1 << 20


MAX_CONFIG_DEPTH = 64


MAX_ALIAS_VALUES = 10_000  # values that aliases add to the config, counted as expanded


def read_yaml(path: str | os.PathLike) -> RawConfig:
    """Parse a YAML config safely, keeping the line of every key."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:  # read no more than the limit allows: /dev/zero or a pipe never ends
            data = fh.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            size = p.stat().st_size if p.is_file() else 0
            shown = f"{size:,} bytes" if size else f"more than {MAX_CONFIG_BYTES:,} bytes"
            raise ConfigError([f"{p}: the config is {shown}; ft reads configs of at most {MAX_CONFIG_BYTES:,} "
                               "bytes. Is it the right file? Keep data, templates and long lists in files the config "
                               "names (datasets, chat_template: file.jinja)."], str(p))
    except FileNotFoundError:
        raise FtError(f"config file not found: {p}. Check the path (or run `ft run examples/tiny.yaml`).") from None
    except OSError as exc:
        raise FtError(f"could not read the config {p}: {exc.strerror or exc}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([f"{p}:{line}: the config is not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
                           f"{column}). Save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."], str(p)) from None
    return parse_yaml(text, str(p))


def load_yaml_text(text: str, source: str | None = None, what: str = "config") -> tuple[Any, Any]:
    """``(node, data)``: the YAML ``text`` composed (with marks) and loaded, after the limits above are checked
    without building anything (an invalid, too large, too deep or alias-bombed text is one ConfigError)."""
    where = source or f"<{what}>"
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{where}: the {what} is {len(text):,} characters; at most {MAX_CONFIG_BYTES:,} are read."],
                          source)
    try:
        _check_yaml_shape(text, where, what, source)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        raise ConfigError([f"{at}: invalid YAML: {getattr(exc, 'problem', exc)}"], source) from None
    return node, data


def _check_yaml_shape(text: str, where: str, what: str, source: str | None) -> None:
    """Refuse nesting deeper than MAX_CONFIG_DEPTH and aliases that add more than MAX_ALIAS_VALUES values, reading
    the event stream only (PyYAML's parser is iterative; composing is recursive, and expanding aliases is not
    bounded)."""
    depth = 0
    starts: list[int] = []  # the expanded count when each open collection started
    anchored: list[str | None] = []
    sizes: dict[str, int] = {}  # anchor -> values in its node, aliases expanded
    expanded = written = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError([f"{where}:{event.start_mark.line + 1}: the {what} nests deeper than "
                                   f"{MAX_CONFIG_DEPTH} levels; a config needs a few. Is it the right file?"], source)
            starts.append(expanded)
            anchored.append(event.anchor)
            expanded += 1
            written += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            start, anchor = starts.pop(), anchored.pop()
            if anchor is not None:
                sizes[anchor] = expanded - start
        elif isinstance(event, yaml.ScalarEvent):
            expanded += 1
            written += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            expanded += sizes.get(event.anchor, 1)
            written += 1
            if expanded - written > MAX_ALIAS_VALUES:
                raise ConfigError([f"{where}:{event.start_mark.line + 1}: the alias *{event.anchor} makes the {what} "
                                   f"expand to {expanded:,} values, {expanded - written:,} of them from aliases; at "
                                   f"most {MAX_ALIAS_VALUES:,} may come from aliases (nested aliases multiply: an "
                                   "alias bomb?). Write the values out, or alias less."], source)


def parse_yaml(text: str, source: str | None = None) -> RawConfig:
    node, data = load_yaml_text(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source or '<config>'}: the top level must be a mapping of keys to values"], source)
    lines: dict[tuple, int] = {}
    problems: list[str] = []
    _walk_lines(node, (), lines, problems, source)
    if problems:
        raise ConfigError(problems, source)
    return RawConfig(data, lines, source)


def _walk_lines(node: Any, path: tuple, lines: dict, problems: list, source: str | None) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(f"{source or '<config>'}:{line}: {format_loc(path + (key,))}: duplicate key "
                                f"(first at line {seen[key]}); keep one.")
            seen[key] = line
            lines[path + (key,)] = line
            _walk_lines(value_node, path + (key,), lines, problems, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk_lines(item, path + (i,), lines, problems, source)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML scalars."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise FtError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set lora.r=8")
        key, _, raw = item.partition("=")
        value = load_yaml_text(raw, f"--set {key}", "--set value")[1] if raw != "" else ""
        parts = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
        target: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(target, list):
                if not isinstance(part, int) or part >= len(target):
                    raise FtError(f"--set {key}: index {part} is out of range (list has {len(target)} items)")
                target = target[part]
                continue
            if part not in target or target[part] is None:
                target[part] = [] if isinstance(nxt, int) else {}
            target = target[part]
        last = parts[-1]
        if isinstance(target, list):
            if not isinstance(last, int) or last >= len(target):
                raise FtError(f"--set {key}: index {last} is out of range")
        target[last] = value
    return data


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
