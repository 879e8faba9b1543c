"""Packing: best-fit-decreasing bins, and packed batches that equal the unpacked samples exactly."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from ft_plugins.packing import PackedCollator, pack_best_fit_decreasing, pack_dataset
from test_data import prepare, qa_rows, write_lines

from ft.kernel.formats import IGNORE_INDEX


def test_best_fit_decreasing_places_every_sample_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(2000)]
    bins = pack_best_fit_decreasing(lengths, 128)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # best fit: no two bins could be merged
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert loads[0] + loads[1] > 128


def test_best_fit_picks_the_fullest_bin_that_fits():
    # longest first: 9 -> A (2 left); 6 -> B (5 left); 5 -> B, exactly full; 4 fits nowhere -> C;
    # 1 fits A (2 left) and C (7 left): best fit takes A, the fuller one.
    bins = pack_best_fit_decreasing([6, 5, 9, 4, 1], 11)
    assert sorted(map(sorted, bins)) == [[0, 1], [2, 4], [3]]


def test_a_sample_longer_than_the_bin_is_refused():
    from ft.kernel.errors import DataError

    with pytest.raises(DataError, match="more than the bin size"):
        pack_best_fit_decreasing([3, 20], 16)


def chat_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Lengths of 1-6 turn conversations (what the bench generates)."""
    rng = random.Random(seed)
    return [sum(rng.randint(30, 180) for _ in range(rng.randint(1, 6))) + 10 for _ in range(n)]


def test_efficiency_reaches_99_5_percent_at_2048_on_chat_like_data():
    lengths = chat_like_lengths(20000)
    bins = pack_best_fit_decreasing(lengths, 2048)
    efficiency = sum(lengths) / (len(bins) * 2048)
    assert efficiency >= 0.995
    assert len(bins) <= -(-sum(lengths) // 2048) + 0.005 * len(bins)


def dataset_of(samples: list[tuple[list[int], list[int]]]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [s[0] for s in samples], "labels": [s[1] for s in samples]})


def test_pack_dataset_restarts_positions_and_masks_each_first_label():
    samples = [([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [IGNORE_INDEX, 7, 8, 9])]
    packed = pack_dataset(dataset_of(samples), 9)
    assert len(packed) == 1
    row = packed[0]
    assert sorted(row["input_ids"]) == list(range(1, 10))
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) == 3
    assert all(row["labels"][i] == IGNORE_INDEX for i in starts)
    for s, e in zip(starts, starts[1:] + [9], strict=True):
        assert row["position_ids"][s:e] == list(range(e - s))


# -- (a) exactness: packed batch == the same samples one by one --------------------------------


def exactness_bins():
    """Lengths 6,5,5 | 4,4,3 with capacity 16: the first bin ends exactly at the edge."""
    rng = np.random.default_rng(0)
    samples = []
    for n in (6, 5, 5, 4, 4, 3):
        ids = rng.integers(5, 400, size=n).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2:]  # a prompt part that is not trained
        samples.append((ids, labels))
    return samples


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_gives_the_same_logits_and_loss_as_unpacked(ft_tiny_model_dir, attn):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    samples = exactness_bins()
    packed = pack_dataset(dataset_of(samples), 16)
    rows = [packed[i] for i in range(len(packed))]
    assert sorted(len(r["input_ids"]) for r in rows) == [11, 16]
    assert all(sum(p == 0 for p in r["position_ids"]) >= 3 for r in rows)

    batch = PackedCollator(pad_token_id=0, attention="mask")(rows)
    assert batch["attention_mask"].shape == (2, 1, 16, 16) and batch["attention_mask"].dtype == torch.float32
    with torch.no_grad():
        out = model(**batch)

    by_ids = {tuple(ids): (ids, labels) for ids, labels in samples}
    total_loss, total_count, checked = 0.0, 0, 0
    with torch.no_grad():
        for b, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for s, e in zip(starts, starts[1:], strict=False):
                ids, labels = by_ids[tuple(row["input_ids"][s:e])]
                ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
                got = out.logits[b, s:e]
                rel = ((got - ref.logits[0]).abs().max() / ref.logits[0].abs().max()).item()
                assert rel < 1e-5, f"bin {b} sample at {s}: max relative difference {rel}"
                n = sum(x != IGNORE_INDEX for x in labels[1:])
                total_loss += ref.loss.item() * n
                total_count += n
                checked += 1
    assert checked == 6
    unpacked_loss = total_loss / total_count
    assert abs(out.loss.item() - unpacked_loss) / unpacked_loss < 1e-5


def test_padding_never_attends_to_real_tokens_and_is_not_trained():
    import torch

    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 1, 2]},
            {"input_ids": [4, 5, 6, 7, 8], "labels": [4, 5, 6, 7, 8], "position_ids": [0, 1, 0, 1, 2]}]
    batch = PackedCollator(pad_token_id=0, attention="mask", pad_to_multiple_of=8)(rows)
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 8, 8)
    allowed = mask[0, 0] == 0
    assert not allowed[3:, :3].any() and not allowed[:3, 3:].any()  # padding block is separate
    assert torch.equal(allowed[3:, 3:], torch.ones(5, 5, dtype=torch.bool).tril())  # causal inside padding
    assert allowed.diagonal().all()  # no row fully masked (that would give NaN)
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 2, 3] + [IGNORE_INDEX] * 5
    assert batch["labels"][1].tolist()[:5] == [IGNORE_INDEX, 5, IGNORE_INDEX, 7, 8]
    allowed1 = mask[1, 0] == 0
    assert not allowed1[2, 1] and allowed1[4, 2] and not allowed1[4, 1]
    assert torch.equal(batch["position_ids"][0], torch.tensor([0, 1, 2, 0, 1, 2, 3, 4]))


def test_varlen_mode_flattens_the_batch_without_a_mask():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 1, 2]},
            {"input_ids": [4, 5, 6, 7, 8], "labels": [4, 5, 6, 7, 8], "position_ids": [0, 1, 0, 1, 2]}]
    batch = PackedCollator(pad_token_id=0, attention="varlen")(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, 7, 8]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and batch["max_length_q"] == 3


@pytest.mark.parametrize("name, mode", [("eager", "mask"), ("sdpa", "mask"), (None, "mask"),
                                        ("flash_attention_2", "varlen"), ("flash_attention_3", "varlen"),
                                        ("kernels-community/flash-attn2", "varlen")])
def test_attention_mode_follows_the_attention_implementation(name, mode):
    assert PackedCollator.attention_for(name) == mode


# -- through prepare_datasets with the plugin selected -------------------------------------------


def test_prepare_with_packing_selected_packs_and_reports_efficiency(tmp_path, ft_tiny_tokenizer):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in qa_rows(60)])
    plain = prepare(tmp_path, ft_tiny_tokenizer, a, sequence_len=64, dataset_prepared_path=str(tmp_path / "p1"))
    out = prepare(tmp_path, ft_tiny_tokenizer, a, plugin_args=["packing"], sequence_len=64,
                  dataset_prepared_path=str(tmp_path / "p2"))
    assert out.packed and not plain.packed
    assert out.train.column_names == ["input_ids", "labels", "position_ids"]
    assert len(out.train) < len(plain.train)
    assert all(len(r) <= 64 for r in out.train["input_ids"])
    total = sum(len(r) for r in plain.train["input_ids"])
    assert out.stats["tokens"] == total == sum(len(r) for r in out.train["input_ids"])
    assert out.stats["packing_efficiency"] == pytest.approx(total / (len(out.train) * 64), abs=1e-6)
    # every sample is in there once, its labels intact except the (never-trained) first one
    unpacked = sorted(tuple(r) for r in plain.train["input_ids"])
    repacked = []
    for r in out.train:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        repacked += [tuple(r["input_ids"][s:e]) for s, e in zip(starts, starts[1:], strict=False)]
    assert sorted(repacked) == unpacked


def test_packing_plugin_supplies_the_packed_collator(tmp_path, monkeypatch):
    from ft_plugins import hf, packing

    monkeypatch.setattr(hf, "attention_problems", lambda cfg: [])  # flash_attn need not be installed here
    from test_data import base_config, make_context

    class Tok:
        pad_token_id = 7
        eos_token_id = 2

    ctx = make_context(base_config(tmp_path, tmp_path / "x.jsonl"), ["packing"])
    collator = ctx.pm.call("ft_collator", cfg=ctx.cfg, tokenizer=Tok(), method=ctx.method)
    assert isinstance(collator, PackedCollator) and collator.pad_token_id == 7 and collator.attention == "mask"
    import torch

    assert collator.mask_dtype == torch.float32  # bf16: auto is fp32 on CPU
    flash = make_context(base_config(tmp_path, tmp_path / "x.jsonl", hf={"attn_implementation": "flash_attention_2"}),
                         ["packing"])
    assert flash.pm.call("ft_collator", cfg=flash.cfg, tokenizer=Tok(), method=flash.method).attention == "varlen"
    assert isinstance(packing.ft_collator(ctx.cfg, Tok(), ctx.method), PackedCollator)


def test_position_ids_go_with_the_token_columns_when_packing_but_are_no_token_ids(ft_tiny_tokenizer):
    """One is_token_column serves the data checks and packing; they differ only on position_ids: one value
    per token (packing joins them like the token columns), but not token ids (not checked against the vocabulary)."""
    from datasets import Dataset
    from ft_plugins.packing import _unit_values

    from ft.engine.columns import is_token_column
    from ft.engine.data import token_id_problem

    names = ("input_ids", "chosen_input_ids", "labels", "rejected_labels", "position_ids", "margin", "label")
    assert [is_token_column(n) for n in names] == [True, True, True, True, False, False, False]
    assert [is_token_column(n, positions=True) for n in names] == [True, True, True, True, True, False, False]

    vocab = len(ft_tiny_tokenizer)
    long_positions = Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]], "position_ids": [[0, vocab]]})
    assert token_id_problem(long_positions, ft_tiny_tokenizer) is None, "positions are not token ids"
    bad_ids = Dataset.from_dict({"input_ids": [[1, vocab]], "labels": [[-100, 2]]})
    assert "token id" in token_id_problem(bad_ids, ft_tiny_tokenizer)

    packed = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "position_ids": [0, 1, 0, 1], "margin": [0.5, 1.5]}]
    assert set(_unit_values(packed)) == {"margin"}, "a packed row's position_ids are per token, not per unit"
