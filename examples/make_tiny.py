"""Regenerate the tiny demo assets that ``examples/tiny.yaml`` trains on (offline, a few seconds).

    python examples/make_tiny.py

Writes ``examples/tiny/model/`` (a randomly initialised Llama-architecture model with a
byte-level BPE tokenizer and a ChatML template, made by ``ft.tools.tiny``),
``examples/tiny/chat.jsonl`` (small synthetic conversations: adding two digits) and
``examples/tiny/prompts.jsonl`` (the same questions as prompts with their answers, for
``examples/grpo.yaml``).
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from ft.tools.tiny import make_chat_rows, make_tiny, write_jsonl

HERE = Path(__file__).resolve().parent / "tiny"
MODEL = {"vocab_size": 512, "hidden_size": 96, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 256,
         "max_positions": 512, "seed": 0}
ROWS = {"n": 400, "seed": 0, "max_turns": 2}
PROMPTS = 512


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """``{"prompt": [user message], "answer": "7"}`` rows: questions of the chats, for GRPO."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Please add {a} to {b}."])
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(a + b)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="Where to write model/ and chat.jsonl.")
    out = parser.parse_args().out
    shutil.rmtree(out / "model", ignore_errors=True)
    make_tiny(out / "model", **MODEL)
    write_jsonl(out / "chat.jsonl", make_chat_rows(**ROWS))
    write_jsonl(out / "prompts.jsonl", prompt_rows(PROMPTS))
    size = sum(p.stat().st_size for p in (out / "model").iterdir())
    print(f"wrote {out / 'model'} ({size / 1e6:.2f} MB) and {out / 'chat.jsonl'} ({ROWS['n']} conversations)")


if __name__ == "__main__":
    main()
