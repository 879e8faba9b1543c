"""Regenerate the preference data the examples/{dpo,kto,orpo,simpo}.yaml configs train on (offline).

    python examples/make_preference.py
    python examples/make_preference.py --reward   # examples/tiny/reward_pairs.jsonl (examples/reward_model.yaml)

Writes ``examples/tiny/preference.jsonl``: pairs where the chosen answer adds two digits
correctly and the rejected one is off by 1 to 3, in the three pair layouts the ``preference``
type reads (explicit prompt, implicit prompt, chatml.intel). The ``kto`` type reads the same file
(each pair becomes a desirable and an undesirable row).

With ``--reward``: ``examples/tiny/reward_pairs.jsonl`` for the reward-model demo: the chosen answer
is the right sum; the rejected one is an evasive answer (margin 1.0) or a wrong sum (margin 0.0).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from ft.tools.tiny import write_jsonl

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


EVASIVE = ("I do not know.", "Numbers are hard, sorry.", "Ask me something else.", "Maybe, maybe not.")


def make_reward_pairs(n: int = 800, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Please add {a} to {b}."])
        if i % 2:
            bad, margin = rng.choice(EVASIVE), 1.0
        else:
            wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
            bad, margin = f"The result is {wrong if wrong >= 0 else a + b + 1}.", 0.0
        rows.append({"prompt": question, "chosen": f"The result is {a + b}.", "rejected": bad, "margin": margin})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "preference.jsonl")
    parser.add_argument("--pairs", type=int, default=1200)
    parser.add_argument("--reward", action="store_true", help="write the reward-model demo's pairs instead")
    ns = parser.parse_args()
    if ns.reward:
        out = HERE / "reward_pairs.jsonl" if ns.out == HERE / "preference.jsonl" else ns.out
        write_jsonl(out, make_reward_pairs())
        print(f"wrote {out}")
        return
    write_jsonl(ns.out, make_pairs(ns.pairs))
    print(f"wrote {ns.out} ({ns.pairs} pairs)")


if __name__ == "__main__":
    main()
