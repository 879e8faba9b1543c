"""Write the data of the SmolLM2-135M-Instruct demos (offline, seeded): ``python examples/smollm2/make_data.py``.

The demos run a real pretrained model on a CPU (see examples/smollm2/README.md). Files, under
``examples/smollm2/data/``:

- ``review_pairs.jsonl`` / ``review_pairs_heldout.jsonl``: preference pairs for the reward model. The
  prompt asks for a one-sentence review of a product; the chosen review is favourable, the rejected one
  unfavourable. The held-out pairs use other products *and* other phrasings, so their accuracy measures
  what the reward model learnt (sentiment), not the sentences it saw.
- ``review_prompts.jsonl``: prompts for GRPO with that reward model (products of neither file), and the
  same prompts with a favourable reference review, ``review_references.jsonl``, for EBFT.
- ``sums.jsonl``: "What is a + b?" prompts with the answer, for GRPO's verifiable-reward demo.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent / "data"

TRAIN_PRODUCTS = [
    "coffee maker", "desk lamp", "hiking backpack", "wireless mouse", "rice cooker", "yoga mat", "phone case",
    "electric kettle", "bookshelf", "running shoes", "water bottle", "office chair", "toaster", "umbrella",
    "winter jacket", "blender", "mechanical keyboard", "camping tent", "air purifier", "frying pan",
    "bluetooth speaker", "alarm clock", "travel mug", "garden hose", "bike helmet", "sleeping bag",
    "standing desk", "hair dryer", "laptop stand", "vacuum cleaner",
]
HELDOUT_PRODUCTS = [
    "space heater", "chef's knife", "tablet stand", "rain boots", "pressure cooker", "headphones", "wall clock",
    "picnic blanket", "paint roller", "dog leash", "shower head", "ceiling fan",
]
PROMPT_PRODUCTS = [
    "microwave", "notebook", "sunglasses", "fountain pen", "suitcase", "pillow", "skateboard", "flashlight",
    "teapot", "monitor", "scarf", "coat rack", "lunch box", "scissors", "mirror", "doormat", "candle",
    "toolbox", "bath towel", "wallet", "printer", "sofa", "jigsaw puzzle", "watering can",
]

# Two disjoint sets of phrasings: the first for training pairs, the second for held-out pairs.
GOOD = [
    ["I love this {p}; it works perfectly every single day.", "This {p} is excellent and worth every penny.",
     "A wonderful {p}: sturdy, well made and a joy to use.", "Best {p} I have ever owned, highly recommended.",
     "The {p} exceeded my expectations in every way.", "Fantastic {p}, I would happily buy it again."],
    ["Absolutely delighted with this {p}, it is brilliant.", "The {p} is superb, reliable and beautifully designed.",
     "Great quality {p} that makes my life easier.", "This {p} is a pleasure to use and feels built to last.",
     "Five stars: the {p} is perfect for me.", "Impressive {p}, I am very happy with my purchase."],
]
BAD = [
    ["I hate this {p}; it broke after two days.", "This {p} is terrible and a complete waste of money.",
     "A flimsy {p}: cheap, badly made and annoying to use.", "Worst {p} I have ever owned, avoid it.",
     "The {p} disappointed me in every way.", "Awful {p}, I regret buying it."],
    ["Deeply frustrated with this {p}, it is useless.", "The {p} is dreadful, unreliable and ugly.",
     "Poor quality {p} that makes my life harder.", "This {p} is a pain to use and fell apart quickly.",
     "One star: the {p} is a disaster.", "Disappointing {p}, I am very unhappy with my purchase."],
]
ASK = ["Write a one-sentence review of the {p}.", "Give a short review of a {p} you bought.",
       "In one sentence, what do you think of your new {p}?"]


def review_pairs(products: list[str], phrasing: int, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        p = rng.choice(products)
        rows.append({"prompt": [{"role": "user", "content": rng.choice(ASK).format(p=p)}],
                     "chosen": [{"role": "assistant", "content": rng.choice(GOOD[phrasing]).format(p=p)}],
                     "rejected": [{"role": "assistant", "content": rng.choice(BAD[phrasing]).format(p=p)}]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    ns = parser.parse_args()
    from ft.tools.tiny import write_jsonl

    rng = random.Random(0)
    ns.out.mkdir(parents=True, exist_ok=True)
    files = {
        "review_pairs.jsonl": review_pairs(TRAIN_PRODUCTS, 0, 600, rng),
        "review_pairs_heldout.jsonl": review_pairs(HELDOUT_PRODUCTS, 1, 200, rng),
        "review_prompts.jsonl": [{"prompt": [{"role": "user", "content": a.format(p=p)}]}
                                 for p in PROMPT_PRODUCTS for a in ASK],
        "review_references.jsonl": [{"prompt": [{"role": "user", "content": a.format(p=p)}],
                                     "reference": rng.choice(GOOD[0] + GOOD[1]).format(p=p)}
                                    for p in PROMPT_PRODUCTS for a in ASK],
        "sums.jsonl": [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
                       for a in range(1, 10) for b in range(1, 10)],
    }
    for name, rows in files.items():
        write_jsonl(ns.out / name, rows)
        print(f"wrote {ns.out / name} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
