"""fused_loss: the same loss and gradients as the model's own forward, without the logits of every position."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from ft_plugins import fused_loss
from ft_plugins.packing import PackedCollator

from ft.engine.collate import PaddingCollator

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


CAPABILITIES = {"fsdp": "sharding", "deepspeed": "sharding", "compile": "compiled_forward"}


class _Cfg:
    """What fused_loss reads of a config: the capabilities of the selected plugins and the method's features."""

    def __init__(self, *plugins, method_features=("packing", "eval", "model_loss")):
        self.plugins = list(plugins)
        self.method = "sft"
        self._features = set(method_features)

    def provides(self, capability):
        return any(CAPABILITIES.get(p) == capability for p in self.plugins)

    def method_supports(self, feature):
        return feature in self._features


@pytest.fixture
def tiny_model(ft_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False  # as the Trainer sets it
    return model.train()


def _rows(lengths, prompt=4, vocab=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _patched(model, *plugins):
    patched = copy.deepcopy(model)
    records = fused_loss.ft_patch_model(cfg=_Cfg(*plugins), model=patched)
    return patched, records


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training_step(model, batch, scale=1.0, **kwargs):
    """Loss and every gradient of the patched model equal the model's own (to float32 rounding)."""
    patched, records = _patched(model)
    assert [r.target for r in records] == ["LlamaForCausalLM.forward"]
    ref = model(**batch, **kwargs)
    (ref.loss * scale).backward()
    out = patched(**batch, **kwargs)
    (out.loss * scale).backward()
    assert out.logits is None  # the point: no tokens x vocab tensor
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    ref_grads, grads = _grads(model), _grads(patched)
    assert ref_grads.keys() == grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_padded_batch_same_loss_and_gradients(tiny_model):
    batch = PaddingCollator(pad_token_id=0)(_rows([20, 13, 7, 16]))
    _assert_same_training_step(tiny_model, batch)


def test_num_items_in_batch_and_loss_scaling_are_honoured(tiny_model):
    batch = PaddingCollator(pad_token_id=0)(_rows([18, 9, 12]))
    # the Trainer's count over all accumulated micro-batches; a scaled loss (fp16 scaler, accumulation)
    _assert_same_training_step(tiny_model, batch, scale=0.25, num_items_in_batch=torch.tensor(57))


def test_only_some_parameters_trained(tiny_model):
    for name, p in tiny_model.named_parameters():
        p.requires_grad = "mlp" in name  # like an adapter: the head and embeddings are frozen
    batch = PaddingCollator(pad_token_id=0)(_rows([11, 17]))
    _assert_same_training_step(tiny_model, batch)


def test_packed_batch_with_block_diagonal_mask(tiny_model):
    rows = _rows([9, 6, 12, 5, 7])
    packed = [
        {k: rows[0][k] + rows[1][k] + rows[2][k] for k in ("input_ids", "labels")},
        {k: rows[3][k] + rows[4][k] for k in ("input_ids", "labels")},
    ]
    packed[0]["position_ids"] = list(range(9)) + list(range(6)) + list(range(12))
    packed[1]["position_ids"] = list(range(5)) + list(range(7))
    batch = PackedCollator(pad_token_id=0, attention="mask")(packed)
    _assert_same_training_step(tiny_model, batch)


def test_head_with_bias_and_chunks_smaller_than_the_batch(monkeypatch):
    monkeypatch.setattr(fused_loss, "CHUNK_LOGITS", 7 * 50)  # 7 rows per chunk: several chunks, a short last one
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    bias = torch.randn(50, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=gen)
    labels[:, :3] = -100
    labels[2, 8:] = -100

    loss = fused_loss.causal_lm_loss(hidden, weight, bias, labels=labels)
    loss.backward()
    got = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = torch.nn.functional.linear(hidden, weight, bias)[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g, t in zip(got, (hidden, weight, bias), strict=True):
        torch.testing.assert_close(g, t.grad)


def test_own_forward_in_eval_without_labels_and_for_an_adapted_head(tiny_model):
    patched, _ = _patched(tiny_model)
    batch = PaddingCollator(pad_token_id=0)(_rows([10, 6]))
    assert patched(input_ids=batch["input_ids"]).logits is not None  # generation, no labels
    patched.eval()
    assert patched(**batch).logits is not None  # evaluation keeps its logits
    patched.train()
    assert patched(**batch, output_hidden_states=True).logits is not None  # outputs asked for
    hook = patched.lm_head.register_forward_hook(lambda module, args, out: out)
    assert patched(**batch).logits is not None  # a hook on the head must still see its output
    hook.remove()
    assert patched(**batch).logits is None

    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(patched, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    out = adapted(**batch)  # the head is a LoRA layer: the fused path would miss its update
    assert out.logits is not None and torch.isfinite(out.loss)


def test_under_a_lora_adapter_the_head_stays_fused(tiny_model):
    from peft import LoraConfig, get_peft_model

    patched, _ = _patched(tiny_model)
    adapted = get_peft_model(patched, LoraConfig(r=2, target_modules="all-linear"))
    out = adapted(**PaddingCollator(pad_token_id=0)(_rows([10, 6])))
    out.loss.backward()
    assert out.logits is None
    assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)


@pytest.mark.parametrize("plugins", [("fsdp",), ("deepspeed",), ("compile",)])
def test_steps_aside_for_sharding_and_compile(tiny_model, plugins):
    patched, records = _patched(tiny_model, *plugins)
    assert records == [] and "forward" not in vars(patched)


def test_steps_aside_for_methods_that_compute_their_own_loss(tiny_model):
    assert "computes its own loss" in fused_loss.not_applicable(_Cfg(method_features=("eval",)), tiny_model)


def test_steps_aside_when_another_plugin_replaced_forward(tiny_model):
    tiny_model.forward = tiny_model.forward  # what liger's fused cross-entropy and compile do to the instance
    assert "another plugin replaced" in fused_loss.not_applicable(_Cfg(), tiny_model)


def test_models_whose_logits_are_scaled_are_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    assert "model type 'gpt2'" in fused_loss.not_applicable(_Cfg(), model)


@pytest.mark.parametrize("plugins", [["lora"], ["packing", "varlen"]], ids=["lora", "packing-varlen"])
def test_run_trains_like_the_model_own_loss(ft_config, ft_dataset, ft_runner, plugins):
    data = ft_dataset(n=24)
    history = {}
    extra = {"lora": {"dropout": 0.0}} if "lora" in plugins else {}
    for flag in ("fused_loss", "no:fused_loss"):
        out = data.parent / flag.replace(":", "-")
        cfg = ft_config(name=f"{flag.replace(':', '-')}.yaml", dataset=data, plugins=plugins, max_steps=3,
                        micro_batch_size=3, output_dir=str(out), **extra)
        torch.manual_seed(0)  # the adapter's initial weights come from the process's random state
        ft_runner.run(cfg, "-p", flag).assert_ok()
        metrics = json.loads((out / "metrics.json").read_text())
        history[flag] = [row["loss"] for row in metrics["history"]]
        manifest = json.loads((out / "ft_plugins.json").read_text())
        fused = [p for p in manifest["patches"] if p.startswith("[fused_loss]")]
        assert len(fused) == (1 if flag == "fused_loss" else 0)
    assert len(history["fused_loss"]) == 3
    assert history["fused_loss"] == pytest.approx(history["no:fused_loss"], rel=1e-5)
