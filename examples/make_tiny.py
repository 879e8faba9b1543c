"""Regenerate the tiny demo assets that ``examples/tiny.yaml`` trains on (offline, a few seconds).

    python examples/make_tiny.py

Writes ``examples/tiny/model/`` (a randomly initialised Llama-architecture model with a
byte-level BPE tokenizer and a ChatML template, made by ``ft.tiny``) and
``examples/tiny/chat.jsonl`` (small synthetic conversations: adding two digits).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ft.tiny import make_chat_rows, make_tiny, write_jsonl

HERE = Path(__file__).resolve().parent / "tiny"
MODEL = {"vocab_size": 512, "hidden_size": 96, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 256,
         "max_positions": 512, "seed": 0}
ROWS = {"n": 400, "seed": 0, "max_turns": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="Where to write model/ and chat.jsonl.")
    out = parser.parse_args().out
    shutil.rmtree(out / "model", ignore_errors=True)
    make_tiny(out / "model", **MODEL)
    write_jsonl(out / "chat.jsonl", make_chat_rows(**ROWS))
    size = sum(p.stat().st_size for p in (out / "model").iterdir())
    print(f"wrote {out / 'model'} ({size / 1e6:.2f} MB) and {out / 'chat.jsonl'} ({ROWS['n']} conversations)")


if __name__ == "__main__":
    main()
