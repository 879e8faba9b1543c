"""varlen: exact attention over packed rows, from cu_seq_lens, without a (L x L) mask."""

from __future__ import annotations

import json

import pytest
import torch
from ft_plugins import varlen

from ft.kernel.errors import FtError


class _Cfg:
    """The two things ft_patch_model reads from a config."""

    def __init__(self, **section):
        self.plugins = ["varlen", "packing"]
        self._section = varlen.VarlenOptions(**section)  # absent from the YAML: the defaults

    def section(self, name):
        return self._section if name == "varlen" else None


@pytest.fixture
def tiny_model(ft_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False  # as the Trainer sets it
    return model


def _packed(lengths, vocab=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, ids, pos


def _undo_all(records):
    for r in reversed(records):
        if r.undo:
            r.undo()


def test_cu_seqlens_from_position_ids_cut_where_positions_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    cu, longest = varlen.cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 9, 15, 18]  # the second row starts a sequence at 9 whatever its positions
    assert longest == 6


def test_cu_seqlens_separate_padding_from_tokens():
    # right padding (two rows) and left padding: padding never joins a real sequence
    pos = torch.arange(6).expand(3, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    cu, longest = varlen.cu_seqlens_from_position_ids(pos, mask)
    assert cu.tolist() == [0, 4, 6, 12, 14, 18]
    assert longest == 6


def test_cu_seqlens_when_a_row_continues_the_previous_rows_positions():
    pos = torch.tensor([[0, 1, 2], [3, 4, 5]])  # a row boundary is a boundary even if positions continue
    cu, _ = varlen.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 6]


@pytest.mark.parametrize("mask_up_to", [4096, 0], ids=["one-masked-call", "per-sequence"])
def test_reference_equals_block_diagonal_sdpa_with_gqa(monkeypatch, mask_up_to):
    monkeypatch.setattr(varlen, "REFERENCE_MASK_TOKENS", mask_up_to)
    torch.manual_seed(0)
    lengths = [4, 7, 1, 5]
    total, heads, kv_heads, dim = sum(lengths), 4, 2, 8
    q, k, v = torch.randn(total, heads, dim), torch.randn(total, kv_heads, dim), torch.randn(total, kv_heads, dim)
    cu = torch.tensor([0, 4, 11, 12, 17], dtype=torch.int32)
    out = varlen.reference_varlen(q, k, v, cu, scale=dim**-0.5)

    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    kk, vv = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), attn_mask=allowed
    ).transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_packed_logits_and_grads_equal_unpacked(tiny_model):
    seqs, ids, pos = _packed([5, 9, 3, 11])
    reference = torch.cat([tiny_model(input_ids=s[None]).logits[0] for s in seqs])
    tiny_model.zero_grad()
    reference.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    records = varlen.ft_patch_model(_Cfg(), tiny_model)
    try:
        assert tiny_model.config._attn_implementation == varlen.ATTENTION_NAME
        tiny_model.zero_grad()
        logits = tiny_model(input_ids=ids, position_ids=pos).logits[0]
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        logits.square().mean().backward()
        for name, p in tiny_model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        _undo_all(records)


def test_a_mask_of_ones_does_not_let_sequences_attend_to_each_other(tiny_model):
    seqs, ids, pos = _packed([6, 6, 4])
    reference = torch.cat([tiny_model(input_ids=s[None]).logits[0] for s in seqs])
    records = varlen.ft_patch_model(_Cfg(), tiny_model)
    try:
        logits = tiny_model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits[0]
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    finally:
        _undo_all(records)


def test_right_padded_batch_without_packing_matches_sdpa(tiny_model):
    ids = torch.randint(0, 500, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    expected = tiny_model(input_ids=ids, attention_mask=mask).logits
    records = varlen.ft_patch_model(_Cfg(), tiny_model)
    try:
        logits = tiny_model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[1, :5], expected[1, :5], rtol=1e-5, atol=1e-5)
    finally:
        _undo_all(records)


def test_boundaries_are_computed_once_per_forward_also_under_lora(tiny_model, monkeypatch):
    peft = pytest.importorskip("peft")
    calls = []
    real = varlen.cu_seqlens_from_position_ids
    monkeypatch.setattr(varlen, "cu_seqlens_from_position_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    records = varlen.ft_patch_model(_Cfg(), tiny_model)
    try:
        model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=4, target_modules="all-linear"))
        _, ids, pos = _packed([3, 5])
        model(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
        assert len(calls) == 1  # by the decoder's pre-hook; every layer reuses them
    finally:
        _undo_all(records)


def test_undo_restores_attention_registry_and_model(tiny_model):
    from transformers import AttentionInterface

    before = dict(AttentionInterface._global_mapping)
    records = varlen.ft_patch_model(_Cfg(), tiny_model)
    assert varlen.ATTENTION_NAME in AttentionInterface._global_mapping
    assert [r.undo is not None for r in records].count(True) == 1
    _undo_all(records)
    assert AttentionInterface._global_mapping == before
    assert tiny_model.config._attn_implementation == "sdpa"
    decoder = tiny_model.model
    assert not decoder._forward_pre_hooks


def test_saved_config_does_not_name_the_run_only_attention(tiny_model, tmp_path):
    records = varlen.ft_patch_model(_Cfg(), tiny_model)
    try:
        tiny_model.config.save_pretrained(tmp_path)
    finally:
        _undo_all(records)
    assert varlen.ATTENTION_NAME not in (tmp_path / "config.json").read_text()


def test_missing_flash_attn_says_how_to_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(FtError, match=r"pip install flash-attn"):
        varlen.resolve_cuda_kernel("flash_attn")


def test_unsupported_model_is_refused_in_one_sentence():
    with pytest.raises(FtError, match="deselect varlen") as info:
        varlen.ft_patch_model(_Cfg(), torch.nn.Linear(2, 2))
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gpu_kernel_matches_reference(ft_tiny_model_dir, backend):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, dtype=torch.bfloat16).cuda()
    model.config.use_cache = False
    seqs, ids, pos = _packed([40, 90, 7, 120])
    ids, pos = ids.cuda(), pos.cuda()
    records = varlen.ft_patch_model(_Cfg(backend="reference"), model)
    try:
        ref = model(input_ids=ids, position_ids=pos, labels=ids)
        ref.loss.backward()
        ref_grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    finally:
        _undo_all(records)
    model.zero_grad()
    records = varlen.ft_patch_model(_Cfg(backend=backend), model)
    try:
        out = model(input_ids=ids, position_ids=pos, labels=ids)
        out.loss.backward()
    finally:
        _undo_all(records)
    torch.testing.assert_close(out.logits.float(), ref.logits.float(), rtol=2e-2, atol=2e-2)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-2
    for name, p in model.named_parameters():
        g, r = p.grad.float(), ref_grads[name]
        assert (g - r).norm() <= 5e-2 * r.norm() + 1e-6, name


def test_run_with_varlen_trains_like_the_masked_packed_run(ft_config, ft_dataset, ft_runner):
    from transformers import AttentionInterface

    data = ft_dataset(n=24)
    history = {}
    for plugins in (["packing"], ["packing", "varlen"]):
        name = "-".join(plugins)
        out = data.parent / name
        cfg = ft_config(name=f"{name}.yaml", dataset=data, plugins=plugins, max_steps=3, micro_batch_size=3,
                        output_dir=str(out))
        ft_runner.run(cfg).assert_ok()
        history[name] = [row["loss"] for row in json.loads((out / "metrics.json").read_text())["history"]]
    assert len(history["packing"]) == 3
    assert history["packing-varlen"] == pytest.approx(history["packing"], rel=1e-5)
    assert varlen.ATTENTION_NAME not in AttentionInterface._global_mapping  # undone when the run ended
