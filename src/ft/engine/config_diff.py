"""What a resumed run changed in its config against the checkpoint it resumes from (a change that alters
training is refused, one that does not is reported)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.engine.checkpoints import CONFIG_FILE

if TYPE_CHECKING:
    from ft.kernel.context import Context


def config_differences(ctx: Context, checkpoint: str | os.PathLike) -> list[str]:
    """``key: saved -> now`` for every value that changes training and differs between the checkpoint's
    config and this one. Keys and sections declared ``affects_training: False`` may differ (where files
    go, how often to log or save); a plugin section that is absent on one side and at its defaults (or
    null) on the other is no difference, and neither is a dataset option absent on one side and at its
    default on the other."""
    import yaml

    from ft.engine.record import saveable_config
    from ft.kernel.config import entry_default, training_values

    file = Path(checkpoint) / CONFIG_FILE
    if not file.is_file():
        return []
    try:
        saved = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return [f"{CONFIG_FILE} of the checkpoint cannot be read"]
    if not isinstance(saved, dict):
        return [f"{CONFIG_FILE} of the checkpoint is not a mapping"]
    cfg = ctx.cfg
    before_flat = _flatten(training_values(cfg, saved))
    now_flat = _flatten(training_values(cfg, saveable_config(cfg)))
    out = []
    for key in sorted(set(before_flat) | set(now_flat), key=_natural):
        a, b = before_flat.get(key, _ABSENT), now_flat.get(key, _ABSENT)
        if a == b:
            continue
        entry = _ENTRY_KEY.match(key)
        if entry and (a is _ABSENT or b is _ABSENT):
            default = entry_default(cfg, entry.group(1), int(entry.group(2)), entry.group(3))
            if (b if a is _ABSENT else a) == default:
                continue
        out.append(f"{key}: {_show(a)} -> {_show(b)}")
    return out


_ENTRY_KEY = re.compile(r"^(datasets|test_datasets)\[(\d+)\]\.([^.\[]+)$")


_ABSENT = object()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)
