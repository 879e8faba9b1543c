"""Datasets mixed by weight (each gets its share of the training rows), and packing of the eval set."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from ft.engine.data import prepare_datasets
from ft.kernel.context import load_context
from ft.tools.tiny import write_jsonl


def talks(tag: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}?"},
                          {"role": "assistant", "content": f"{tag} answer {i}."}]} for i in range(n)]


def prepare(ft_tiny_model_dir, tmp_path, entries, **extra):
    from transformers import AutoTokenizer

    config = {"base_model": str(ft_tiny_model_dir), "datasets": entries, "sequence_len": 128,
              "dataset_prepared_path": str(tmp_path / "prepared"), **extra}
    ctx = load_context(config)
    tok = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    return prepare_datasets(ctx, tok), tok


def sources(data, tok) -> Counter:
    """How many training rows came from each dataset (the tag in the user's question)."""
    return Counter(tok.decode(row["input_ids"]).split("user\n", 1)[1].split(" ", 1)[0] for row in data.train)


@pytest.fixture
def two_sets(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", talks("big", 90))
    small = write_jsonl(tmp_path / "small.jsonl", talks("small", 10))
    return big, small


def test_without_weights_every_row_once(ft_tiny_model_dir, tmp_path, two_sets):
    big, small = two_sets
    data, tok = prepare(ft_tiny_model_dir, tmp_path, [{"path": str(big), "type": "chat_template"},
                                                    {"path": str(small), "type": "chat_template"}])
    assert sources(data, tok) == {"big": 90, "small": 10}
    assert data.stats["mixing"] is None


def test_weights_set_each_datasets_share_of_the_rows(ft_tiny_model_dir, tmp_path, two_sets):
    big, small = two_sets
    data, tok = prepare(ft_tiny_model_dir, tmp_path, [{"path": str(big), "type": "chat_template", "weight": 1},
                                                    {"path": str(small), "type": "chat_template", "weight": 1}])
    counts = sources(data, tok)
    assert counts == {"big": 50, "small": 50}  # 100 rows in all, half each
    texts = Counter(tok.decode(row["input_ids"]) for row in data.train)
    assert all(texts[t] == 5 for t in texts if "small" in t)  # the small set: every row 5 times
    assert max(texts[t] for t in texts if "big" in t) == 1  # the big set: 50 of its rows, once each
    report = {m["path"].rsplit("/", 1)[-1]: m for m in data.stats["mixing"]}
    assert report["small.jsonl"] == {"path": str(small), "weight": 1.0, "available": 10, "rows": 50,
                                     "share": 0.5, "repeats": 5.0}
    assert report["big.jsonl"]["rows"] == 50 and report["big.jsonl"]["repeats"] == pytest.approx(50 / 90, abs=1e-4)
    stats = json.loads((tmp_path / "prepared" / data.cache_dir.rsplit("/", 1)[-1] / "stats.json").read_text())
    assert stats["mixing"] == data.stats["mixing"]  # written with the prepared data


def test_an_unweighted_entry_counts_as_weight_one_and_copies_stay_out_of_eval(ft_tiny_model_dir, tmp_path, two_sets):
    big, small = two_sets
    data, tok = prepare(ft_tiny_model_dir, tmp_path, [{"path": str(big), "type": "chat_template"},
                                                    {"path": str(small), "type": "chat_template", "weight": 3}],
                        val_set_size=0.1)
    counts = sources(data, tok)
    assert sum(counts.values()) == 90 and counts["small"] == pytest.approx(90 * 3 / 4, abs=1)
    held_out = {tok.decode(row["input_ids"]) for row in data.eval}
    assert not held_out & {tok.decode(row["input_ids"]) for row in data.train}  # no row on both sides


def test_weights_change_the_cache_key(ft_tiny_model_dir, tmp_path, two_sets):
    big, small = two_sets
    one, _ = prepare(ft_tiny_model_dir, tmp_path, [{"path": str(big), "type": "chat_template", "weight": 1},
                                                {"path": str(small), "type": "chat_template", "weight": 1}])
    two, _ = prepare(ft_tiny_model_dir, tmp_path, [{"path": str(big), "type": "chat_template", "weight": 1},
                                                {"path": str(small), "type": "chat_template", "weight": 2}])
    assert one.cache_dir != two.cache_dir


def test_a_weight_must_be_positive(ft_tiny_model_dir, tmp_path, two_sets):
    from ft.kernel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"datasets\[0\]\.weight: Input should be greater than 0"):
        load_context({"base_model": str(ft_tiny_model_dir),
                      "datasets": [{"path": str(two_sets[0]), "type": "chat_template", "weight": 0}]})


# -- packing the eval set ------------------------------------------------------------------------


def test_eval_set_is_packed_with_training_unless_told_not(ft_tiny_model_dir, tmp_path, two_sets):
    big, _ = two_sets
    entries = [{"path": str(big), "type": "chat_template"}]
    packed, _ = prepare(ft_tiny_model_dir, tmp_path, entries, plugins=["packing"], val_set_size=0.2)
    assert "position_ids" in packed.eval.column_names and len(packed.eval) < 18
    assert packed.stats["eval_bins"] == len(packed.eval)
    plain, _ = prepare(ft_tiny_model_dir, tmp_path, entries, plugins=["packing"], val_set_size=0.2,
                       eval_sample_packing=False)
    assert "position_ids" not in plain.eval.column_names and len(plain.eval) == 18
    assert sum(len(r) for r in packed.eval["input_ids"]) == sum(len(r) for r in plain.eval["input_ids"])
