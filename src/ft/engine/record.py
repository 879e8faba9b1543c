"""What a run records about itself: its config as saved, and its token totals over all ranks.

Checkpoints (``ft.engine.checkpoints``), the final outputs (``ft.engine.outputs``), the resume decision
(``ft.engine.resume``) and training (``ft.engine.train``) all use these; this module imports none of them, so
the modules that write a run's files import in one direction.

Nothing here imports torch or transformers at module import time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def saveable_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data: secrets redacted, local model and data paths made absolute."""
    from ft.kernel.context import resolve_path

    data = cfg.to_saveable()

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and "://" not in value:
            local = Path(resolve_path(cfg, value))
            if local.exists():
                return str(local.resolve())
        return value

    for key in ("base_model", "tokenizer"):  # a local path stays valid from anywhere
        data[key] = absolute(data.get(key))
    for key in ("datasets", "test_datasets"):
        for entry in data.get(key) or []:
            if isinstance(entry, dict) and "path" in entry:
                entry["path"] = absolute(entry["path"])
    return data


def global_tokens(trainer: Any, state: Any) -> tuple[int, int]:
    """(input tokens, trained tokens) counted so far, summed over every rank.

    A collective in a multi-process run: every rank must call it. ``state`` is ft's per-trainer
    state (``ft.engine.train.FtState``), or None for a trainer that ft did not build.
    """
    if state is None:
        return 0, 0
    tokens, trained = state.counter.totals()
    acc = trainer.accelerator
    if acc.num_processes > 1:
        import torch

        both = acc.reduce(torch.tensor([tokens, trained], device=acc.device), reduction="sum")
        tokens, trained = (int(x) for x in both.tolist())
    return tokens, trained


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None: bare ``NaN`` is not JSON, and a
    metrics file that jq, JavaScript or a dashboard cannot read is lost to them. Numbers with ``.item()``
    (numpy, 0-d tensors) become Python numbers first."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if not isinstance(value, (int, float, str, bool)) and value is not None and hasattr(value, "item"):
        try:
            value = value.item()
        except (TypeError, ValueError):  # not a single number
            return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metrics_json(data: Any, indent: int | None = 2) -> str:
    """``data`` (metrics, a history) as JSON text: non-finite values as null, anything else unknown as text."""
    return json.dumps(json_safe(data), indent=indent, default=str, allow_nan=False)
