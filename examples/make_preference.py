"""Regenerate the preference data the examples/{dpo,kto,orpo,simpo}.yaml configs train on (offline).

    python examples/make_preference.py

Writes ``examples/tiny/preference.jsonl``: pairs where the chosen answer adds two digits
correctly and the rejected one is off by 1 to 3, in the three pair layouts the ``preference``
type reads (explicit prompt, implicit prompt, chatml.intel). The ``kto`` type reads the same file
(each pair becomes a desirable and an undesirable row).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from ft.tiny import write_jsonl

HERE = Path(__file__).resolve().parent / "tiny"
SYSTEM = "You add numbers."


def make_pairs(n: int = 1200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Please add {a} to {b}."])
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        if wrong < 0:
            wrong = a + b + 1
        good, bad = f"The result is {a + b}.", f"The result is {wrong}."
        layout = i % 3
        if layout == 0:  # explicit prompt, messages
            rows.append({"prompt": [{"role": "user", "content": question}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        elif layout == 1:  # implicit prompt: whole conversations (the UltraFeedback layout)
            user = {"role": "user", "content": question}
            rows.append({"chosen": [user, {"role": "assistant", "content": good}],
                         "rejected": [user, {"role": "assistant", "content": bad}]})
        else:  # axolotl's chatml.intel layout
            rows.append({"system": SYSTEM, "question": question, "chosen": good, "rejected": bad})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "preference.jsonl")
    parser.add_argument("--pairs", type=int, default=1200)
    ns = parser.parse_args()
    write_jsonl(ns.out, make_pairs(ns.pairs))
    print(f"wrote {ns.out} ({ns.pairs} pairs)")


if __name__ == "__main__":
    main()
