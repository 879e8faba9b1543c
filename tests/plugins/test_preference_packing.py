"""Packed preference pairs are exact: every sequence's log-probability equals its unpacked value.

A pair is one packing unit (chosen then rejected, each with positions from 0), so a pair never
straddles two bins; the collator says where each sequence is (``sequence_ids``). Checked with the
block-diagonal mask (eager and SDPA) and with the varlen attention (flattened rows, no mask), and
through ft's DPO Trainer: the loss and gradients of one packed batch equal those of the same
pairs unpacked.
"""

from __future__ import annotations

import random

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ft_one_torch_thread")]


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        q = f"What is {a} plus {b}?" + " Think." * rng.randint(0, 3)
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": f"The result is {a + b}." + " Sure." * rng.randint(0, 4),
                     "rejected": f"It is {a + b + rng.randint(1, 9)}." + " Maybe." * rng.randint(0, 4)})
    return rows


def prepared(tmp_path, model_dir, rows, plugins=(), name="p", **extra):
    from ft.engine.data import prepare_datasets
    from ft.kernel.context import load_context
    from ft.tools.tiny import write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = {"base_model": str(model_dir), "method": "dpo", "dpo": {"beta": 0.2},
              "datasets": [{"path": str(data), "type": "preference"}], "sequence_len": 96, "shuffle": False,
              "plugins": list(plugins), "dataset_prepared_path": str(tmp_path / name),
              "output_dir": str(tmp_path / f"out-{name}"), "dataset_num_proc": 1, **extra}
    ctx = load_context(config)
    tokenizer = ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg)
    return ctx, tokenizer, prepare_datasets(ctx, tokenizer)


def unpacked_logps(model, ids, labels) -> float:
    import torch

    from ft.api import sequence_logps

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    return sequence_logps(logits, torch.tensor([labels]))[0].item()


@pytest.mark.parametrize("attention", ["eager", "sdpa", "varlen"])
def test_each_packed_sequence_has_its_unpacked_log_probability(tmp_path, ft_tiny_model_dir, attention):
    import torch
    from ft_plugins import varlen
    from ft_plugins.packing import PackedCollator
    from ft_plugins.preference_trainer import forward_logps
    from transformers import AutoModelForCausalLM

    rows = pair_rows(20)
    _ctx, tokenizer, plain = prepared(tmp_path, ft_tiny_model_dir, rows, name="plain")
    _ctx, _tok, packed = prepared(tmp_path, ft_tiny_model_dir, rows, plugins=["packing"], name="packed")
    assert len(plain.train) == len(rows) and packed.packed and len(packed.train) < len(rows)
    assert packed.stats["bin_tokens"] == 192 and 0 < packed.stats["packing_efficiency"] <= 1
    bins = [packed.train[i] for i in range(len(packed.train))]
    # a pair never straddles two bins: every bin holds an even number of sequences
    assert sum(sum(p == 0 for p in b["position_ids"]) for b in bins) == 2 * len(rows)
    assert all(sum(p == 0 for p in b["position_ids"]) % 2 == 0 for b in bins)

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa" if attention == "varlen" else attention)
    model.eval()
    expected = {}
    for r in (plain.train[i] for i in range(len(plain.train))):
        key = (tuple(r["chosen_input_ids"]), tuple(r["rejected_input_ids"]))
        expected[key] = (unpacked_logps(model, r["chosen_input_ids"], r["chosen_labels"]),
                         unpacked_logps(model, r["rejected_input_ids"], r["rejected_labels"]))
    records = []
    if attention == "varlen":
        class Cfg:
            plugins = ["varlen", "packing"]

            def section(self, name):
                return varlen.VarlenOptions()

        records = varlen.ft_patch_model(Cfg(), model)
    try:
        collator = PackedCollator(tokenizer.pad_token_id, attention="varlen" if attention == "varlen" else "mask",
                                  sequences=("chosen_", "rejected_"))
        checked = 0
        for start in range(0, len(bins), 3):
            batch = collator(bins[start:start + 3])
            with torch.no_grad():
                scored = forward_logps(model, batch)
            ids, seq = batch["input_ids"], batch["sequence_ids"]
            for unit in range(scored.sums.numel() // 2):
                key = (tuple(ids[seq == 2 * unit].tolist()), tuple(ids[seq == 2 * unit + 1].tolist()))
                want = expected.pop(key)
                got = (scored.sums[2 * unit].item(), scored.sums[2 * unit + 1].item())
                assert got == pytest.approx(want, rel=1e-5), f"unit {unit} of bins {start}..: {got} != {want}"
                checked += 1
    finally:
        for r in reversed(records):
            if r.undo:
                r.undo()
    assert checked == len(rows) and not expected  # every pair once, intact


def test_a_packed_batch_gives_the_unpacked_dpo_loss_and_gradients(tmp_path, ft_tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from ft.engine.train import build_trainer

    rows = pair_rows(12, seed=1)
    results = []
    for plugins, name in (((), "plain"), (("packing",), "packed")):
        ctx, tokenizer, data = prepared(tmp_path, ft_tiny_model_dir, rows, plugins=plugins, name=name,
                                        micro_batch_size=len(rows))
        model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
        trainer = build_trainer(ctx, model, tokenizer, data)  # the frozen reference is copied here
        torch.manual_seed(0)
        with torch.no_grad():  # move the policy away from the reference
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        batch = trainer.data_collator([data.train[i] for i in range(len(data.train))])
        if plugins:
            assert batch["input_ids"].shape[0] < len(rows) and batch["attention_mask"].dim() == 4
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (packed_loss, packed_grads) = results
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5)
    for name, g in plain_grads.items():
        assert (packed_grads[name] - g).abs().max().item() <= 1e-5 * g.abs().max().item() + 1e-12, name


def test_logits_are_computed_only_where_a_label_is_scored(tmp_path, ft_tiny_model_dir):
    """Prompts and padding never reach the output layer: it sees one row per scored token."""
    import torch
    from ft_plugins.preference_data import UnitCollator
    from ft_plugins.preference_trainer import forward_logps
    from transformers import AutoModelForCausalLM

    _ctx, tokenizer, plain = prepared(tmp_path, ft_tiny_model_dir, pair_rows(6))
    rows = [plain.train[i] for i in range(len(plain.train))]
    batch = UnitCollator(tokenizer.pad_token_id, ("chosen", "rejected"))(rows)
    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, dtype=torch.float32)
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        scored = forward_logps(model, batch)
    scored_tokens = sum(sum(x != -100 for x in r[f"{side}_labels"][1:]) for r in rows for side in ("chosen", "rejected"))
    assert seen == [(1, scored_tokens, model.config.vocab_size)]
    assert batch["input_ids"].numel() > 3 * scored_tokens  # most positions are prompt or padding
    assert int(scored.counts.sum()) == scored_tokens


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_shared_prompt_row_gives_each_side_its_own_log_probability(tmp_path, ft_tiny_model_dir, attention):
    """[prompt | chosen | rejected] in one row: the prompt is computed once, the rejected side never
    sees the chosen one, and both sides score exactly what they score alone."""
    import torch
    from ft_plugins.preference_data import SharedPromptCollator, UnitCollator
    from ft_plugins.preference_trainer import forward_logps
    from transformers import AutoModelForCausalLM

    rows = pair_rows(10, seed=2)
    rows.append({"prompt": "Hi", "chosen": "Hello.", "rejected": [{"role": "user", "content": "Hi"},  # no shared
                 {"role": "assistant", "content": "Yes."}]})  # prompt beyond the first tokens
    _ctx, tokenizer, plain = prepared(tmp_path, ft_tiny_model_dir, rows)
    data = [plain.train[i] for i in range(len(plain.train))]
    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
    model.eval()
    shared = SharedPromptCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(data)
    separate = UnitCollator(tokenizer.pad_token_id, ("chosen", "rejected"))(data)
    assert shared["input_ids"].shape[0] == len(data) and shared["attention_mask"].dim() == 4
    real = int((shared["sequence_ids"] >= 0).sum())
    assert real < int(separate["attention_mask"].sum())  # each prompt once
    with torch.no_grad():
        got, want = forward_logps(model, shared), forward_logps(model, separate)
    torch.testing.assert_close(got.sums, want.sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.counts, want.counts)
    expected = [unpacked_logps(model, r[f"{side}_input_ids"], r[f"{side}_labels"])
                for r in data for side in ("chosen", "rejected")]
    assert got.sums.tolist() == pytest.approx(expected, rel=1e-5)
