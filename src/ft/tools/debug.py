"""``ft preprocess --debug N``: show prepared samples with the trained tokens marked.

Each sample is printed as text, cut into runs of trained / not-trained tokens. On a colour
terminal trained text is green and the rest grey; without colour (a pipe, a log file,
``NO_COLOR``) trained text is wrapped in ``[+ ... +]``, so the view reads the same in CI logs.
Each sample is headed by the file:line it came from; packed bins are split into their samples
(where ``position_ids`` restart).

Rows of several sequences (a preference pair: ``chosen_input_ids``/``chosen_labels``,
``rejected_input_ids``/``rejected_labels``; any ``<name>_input_ids`` with ``<name>_labels``) show
the prompt they share once, then each sequence's completion under its name, then the row's other
columns (a KTO ``label``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from ft.kernel.formats import IGNORE_INDEX

GREEN, GREY, BOLD, RESET = "\033[32m", "\033[90m", "\033[1m", "\033[0m"
OPEN, CLOSE = "[+", "+]"


def use_colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(stream, "isatty") and stream.isatty()


def show_samples(dataset: Any, tokenizer: Any, n: int, stream: TextIO | None = None,
                 colour: bool | None = None, where: Callable[[int], str] | None = None) -> None:
    """Print the first ``n`` samples of ``dataset`` with trained tokens highlighted; ``where(i)`` names
    the file:line sample ``i`` came from (``PreparedData.where``)."""
    out = stream or sys.stdout
    colour = use_colour(out) if colour is None else colour
    legend = (f"{GREEN}green{RESET} = trained, {GREY}grey{RESET} = not trained" if colour
              else f"text inside {OPEN} {CLOSE} is trained; the rest is not")
    if hasattr(dataset, "__len__"):
        rows: Any = (dataset[i] for i in range(min(n, len(dataset))))
        out.write(f"{len(dataset)} rows; showing {min(n, len(dataset))} ({legend})\n")
    else:  # a streamed dataset: its first rows, read now
        import itertools

        rows = itertools.islice(dataset, n)
        out.write(f"a streamed dataset; showing its first {n} rows ({legend})\n")
    for i, row in enumerate(rows):
        if "input_ids" not in row:
            _show_sequences(i, row, tokenizer, colour, out)
            continue
        if "labels" not in row:  # a prompt for online RL: nothing in it is trained; the model completes it
            _show_prompt(i, row, tokenizer, colour, out, where)
            continue
        pieces = list(_samples_of(row))
        trained = sum(_trained(labels) for _ids, labels in pieces)
        tokens = sum(len(ids) for ids, _labels in pieces)
        if "position_ids" in row:
            header = f"--- bin {i + 1}: {len(pieces)} packed samples, {tokens} tokens, {trained} trained ---"
        else:
            origin = f" ({where(i)})" if where is not None else ""
            header = f"--- sample {i + 1}{origin}: {tokens} tokens, {trained} trained ---"
        out.write((f"{BOLD}{header}{RESET}" if colour else header) + "\n")
        for k, (ids, labels) in enumerate(pieces):
            if len(pieces) > 1:
                out.write(f"[sample {k + 1}/{len(pieces)}, {len(ids)} tokens]\n")
            out.write(render(ids, labels, tokenizer, colour) + "\n")
    out.flush()


def _show_prompt(i: int, row: dict[str, Any], tokenizer: Any, colour: bool, out: TextIO,
                 where: Callable[[int], str] | None) -> None:
    """A prompt row (``type: prompt``): its tokens (none trained: completions are generated), then the columns the
    reward functions get."""
    ids = list(row["input_ids"])
    origin = f" ({where(i)})" if where is not None else ""
    header = f"--- prompt {i + 1}{origin}: {len(ids)} tokens; the completions are generated and trained ---"
    out.write((f"{BOLD}{header}{RESET}" if colour else header) + "\n")
    out.write(render(ids, [IGNORE_INDEX] * len(ids), tokenizer, colour) + "\n")
    for key, value in row.items():
        if key not in ("input_ids", "prompt"):
            out.write(f"{key}: {value}\n")


def _show_sequences(i: int, row: dict[str, Any], tokenizer: Any, colour: bool, out: TextIO) -> None:
    """A row of named sequences: the shared prompt once, then each sequence's completion."""
    names = [k[: -len("input_ids")] for k in row if k.endswith("input_ids") and f"{k[: -len('input_ids')]}labels" in row]
    seqs = {name: (list(row[f"{name}input_ids"]), list(row[f"{name}labels"])) for name in names}
    sizes = ", ".join(f"{name.rstrip('_')} {len(ids)} tokens ({_trained(labels[1:])} scored)"
                      for name, (ids, labels) in seqs.items())
    header = f"--- row {i + 1}: {sizes} ---"
    out.write((f"{BOLD}{header}{RESET}" if colour else header) + "\n")
    # the prompt: the tokens every sequence shares before its first scored token
    firsts = [next((k for k, x in enumerate(labels) if x != IGNORE_INDEX), len(labels)) for _i, labels in seqs.values()]
    shared = 0
    reference = next(iter(seqs.values()))[0] if seqs else []
    while shared < min(firsts, default=0) and all(ids[shared] == reference[shared] for ids, _l in seqs.values()):
        shared += 1
    if shared:
        out.write("prompt:\n" + render(reference[:shared], [IGNORE_INDEX] * shared, tokenizer, colour) + "\n")
    for name, (ids, labels) in seqs.items():
        title = name.rstrip("_") if len(seqs) > 1 else "completion"
        out.write(f"{title}:\n" + render(ids[shared:], labels[shared:], tokenizer, colour)
                  + "\n")
    for key, value in row.items():
        if key.endswith("input_ids") or key == "labels" or key.endswith("_labels"):
            continue
        out.write(f"{key}: {value}\n")


def render(ids: list[int], labels: list[int], tokenizer: Any, colour: bool = False) -> str:
    """The text of one sample with its trained runs marked."""
    text = []
    for trained, run in _runs(ids, labels):
        piece = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if colour:
            text.append(f"{GREEN if trained else GREY}{piece}{RESET}")
        else:
            text.append(f"{OPEN}{piece}{CLOSE}" if trained else piece)
    return "".join(text)


def _runs(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    runs: list[tuple[bool, list[int]]] = []
    for tok, lab in zip(ids, labels, strict=True):
        trained = lab != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tok)
        else:
            runs.append((trained, [tok]))
    return runs


def _trained(labels: list[int]) -> int:
    return sum(1 for x in labels if x != IGNORE_INDEX)


def _samples_of(row: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    ids, labels = list(row["input_ids"]), list(row["labels"])
    pos = row.get("position_ids")
    if pos is None:
        return [(ids, labels)]
    starts = [i for i in range(len(pos)) if i == 0 or pos[i] != pos[i - 1] + 1] + [len(pos)]
    return [(ids[s:e], labels[s:e]) for s, e in zip(starts, starts[1:], strict=False)]
