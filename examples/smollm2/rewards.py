"""The reward of grpo_sums.yaml, named there by file path (`rewards.py:says_the_sum`), with no plugin.

TRL's reward signature: the prompts, the completions (messages for chat prompts) and every other column of
the rows (here ``answer``) by name; one float per completion.
"""

from __future__ import annotations

import re


def says_the_sum(prompts, completions, answer, **columns):
    """1.0 when the completion states the right sum as one of its numbers, else 0.0 (the length penalty
    beside it makes a short answer that says only the sum the best one)."""
    out = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
        out.append(1.0 if str(expected) in re.findall(r"\d+", text) else 0.0)
    return out
