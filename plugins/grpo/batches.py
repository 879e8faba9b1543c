"""GRPO's batches: the prompts a micro-batch carries, the shape of a step, and the micro-batches of
prompts and completions the loss is computed on. torch is imported inside functions."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ft_plugins.grpo.config import options

from ft.api import IGNORE_INDEX


class PromptBatch:
    """The prompts of one micro-batch, as the dataloader hands them over (kept out of device moves)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)


def prompt_collator(cfg: Any, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"prompts": PromptBatch([{**r, "prompt": json.loads(r["prompt"])} for r in rows])}

    return collate


def step_shape(cfg: Any, world_size: int) -> tuple[int, int]:
    """``(prompts per device and step, completions per device and step)``."""
    completions = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    return completions // options(cfg).num_generations, completions


def pad_floats(rows: list[list[float]], width: int, device: Any) -> Any:
    """Per-token values right-padded with 0 to ``width`` (``[B, width]`` float32)."""
    import torch

    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out.to(device)


def pack_rows(prompts: list[list[int]], completions: list[list[int]], pad: int, device: Any) -> dict[str, Any]:
    """One micro-batch: prompts left-padded and completions right-padded to their longest, so every row's
    completion starts at the same column (the loss keeps only those logits). Positions count real tokens
    from 0, as during generation."""
    import torch

    p_width, c_width = max(len(p) for p in prompts), max(len(c) for c in completions)
    n = len(prompts)
    ids = torch.full((n, p_width + c_width), pad, dtype=torch.long)
    mask = torch.zeros((n, p_width + c_width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, p_width - len(p):p_width] = torch.as_tensor(p)
        ids[i, p_width:p_width + len(c)] = torch.as_tensor(c)
        mask[i, p_width - len(p):p_width + len(c)] = 1
    completion_mask = mask[:, p_width:]
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :p_width] = IGNORE_INDEX
    ids, mask = ids.to(device), mask.to(device)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "completion_ids": ids[:, p_width:], "completion_mask": completion_mask.to(device),
            "labels": labels.to(device)}


