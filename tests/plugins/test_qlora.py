"""The qlora plugin: the base model is quantized with bitsandbytes (4-bit runs on CPU here)."""

from __future__ import annotations

import json
import sys

import pytest

from ft import hookimpl
from ft.kernel.context import load_context
from ft.kernel.errors import ConfigError, MissingDependencyError


def make_config(model_dir, plugins=("lora", "qlora"), **extra):
    return {
        "base_model": str(model_dir),
        "datasets": [{"path": "unused.jsonl", "type": "chat_template"}],
        "plugins": list(plugins),
        "bf16": False,
        **extra,
    }


# -- (e) validation errors -------------------------------------------------------------------


def test_qlora_needs_lora(ft_tiny_model_dir, write_yaml):
    config = write_yaml(make_config(ft_tiny_model_dir, plugins=["qlora"]))
    with pytest.raises(ConfigError) as excinfo:
        load_context(config)
    text = "\n".join(excinfo.value.problems)
    assert f"{config}:" in text
    assert "plugins: qlora only quantizes the base model; add lora to plugins (plugins: [lora, qlora])" in text


def test_lora_selected_on_the_command_line_counts(ft_tiny_model_dir):
    ctx = load_context(make_config(ft_tiny_model_dir, plugins=["qlora"]), plugin_args=["lora"])
    assert {"lora", "qlora"} <= set(ctx.cfg.plugins)


def test_missing_bitsandbytes_is_one_sentence_with_the_fix(ft_tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(MissingDependencyError) as excinfo:
        load_context(make_config(ft_tiny_model_dir))
    message = str(excinfo.value)
    assert message == (
        "The qlora plugin quantizes with bitsandbytes, which is not installed: pip install 'ft[qlora]'."
    )


def test_4bit_options_with_8_bits_are_refused(ft_tiny_model_dir):
    with pytest.raises(ConfigError) as excinfo:
        load_context(make_config(ft_tiny_model_dir, qlora={"bits": 8, "quant_type": "fp4"}))
    assert "qlora.quant_type: applies to 4-bit only; remove it or set qlora.bits: 4." in excinfo.value.problems


def test_bits_other_than_4_or_8_are_refused(ft_tiny_model_dir):
    with pytest.raises(ConfigError) as excinfo:
        load_context(make_config(ft_tiny_model_dir, qlora={"bits": 3}))
    assert "qlora.bits: Input should be 4 or 8 (got 3)." in excinfo.value.problems


# -- model keyword arguments -----------------------------------------------------------------


def model_kwargs(model_dir, **qlora):
    ctx = load_context(make_config(model_dir, qlora=qlora))
    return ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg)


def test_4bit_config(ft_tiny_model_dir):
    import torch

    q = model_kwargs(ft_tiny_model_dir, quant_type="fp4", double_quant=False, compute_dtype="float32")["quantization_config"]
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "fp4" and q.bnb_4bit_use_double_quant is False
    assert q.bnb_4bit_compute_dtype == torch.float32


def test_defaults_are_nf4_with_double_quant(ft_tiny_model_dir):
    q = model_kwargs(ft_tiny_model_dir)["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant


def test_8bit_config(ft_tiny_model_dir):
    q = model_kwargs(ft_tiny_model_dir, bits=8)["quantization_config"]
    assert q.load_in_8bit and not q.load_in_4bit


def test_adapter_goes_on_a_quantized_base(ft_tiny_model_dir):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    ctx = load_context(make_config(ft_tiny_model_dir, qlora={"compute_dtype": "float32"}, lora={"r": 4}))
    kwargs = ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg)
    base = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, **kwargs)
    model = ctx.pm.call("ft_apply_adapter", cfg=ctx.cfg, model=base)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.dtype == torch.uint8  # packed 4-bit values
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)  # prepared for k-bit training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }


def test_4bit_weights_are_stored_as_uint8_or_in_the_compute_dtype_for_fsdp(ft_tiny_model_dir):
    """FSDP2 shards and casts every parameter: the packed 4-bit weights are then typed as the compute dtype."""
    import torch

    assert model_kwargs(ft_tiny_model_dir)["quantization_config"].bnb_4bit_quant_storage == torch.uint8
    for compute, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        ctx = load_context(make_config(ft_tiny_model_dir, plugins=("lora", "qlora", "fsdp"),
                                       qlora={"compute_dtype": compute}))
        q = ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg)["quantization_config"]
        assert q.bnb_4bit_quant_storage == expected and q.bnb_4bit_compute_dtype == expected


def test_8bit_with_fsdp_is_refused_with_the_reason(ft_tiny_model_dir, write_yaml):
    config = write_yaml(make_config(ft_tiny_model_dir, plugins=["lora", "qlora", "fsdp"], qlora={"bits": 8}))
    with pytest.raises(ConfigError) as excinfo:
        load_context(config)
    text = "\n".join(excinfo.value.problems)
    assert f"{config}:" in text and "qlora.bits: 8-bit (LLM.int8) weights cannot be sharded by fsdp" in text
    assert "Use qlora.bits: 4" in text


def test_fsdp_reinterprets_packed_uint8_weights_in_its_dtype_without_changing_the_model(ft_tiny_model_dir):
    """A 4-bit weight stored otherwise than FSDP gathers it (uint8 here) is viewed as that dtype: same bytes,
    same outputs, and the shape FSDP splits on dim 0."""
    import torch
    from ft_plugins.fsdp import store_packed_weights_as
    from transformers import AutoModelForCausalLM

    kwargs = model_kwargs(ft_tiny_model_dir, compute_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, **kwargs)
    q_proj = model.model.layers[0].self_attn.q_proj
    packed = q_proj.weight.data.clone()
    assert packed.dtype == torch.uint8
    model.train()  # (in eval mode bitsandbytes repacks CPU weights into another layout)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        before = model(ids).logits
    layers = sum(1 for m in model.modules() if hasattr(m, "quant_state"))
    for dtype in (torch.bfloat16, torch.float32):
        assert store_packed_weights_as(model, dtype) == layers > 0
        assert q_proj.weight.dtype == dtype and q_proj.weight.shape == (packed.numel() // dtype.itemsize, 1)
        assert torch.equal(q_proj.weight.data.view(torch.uint8).reshape(-1), packed.reshape(-1))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, before)
    assert store_packed_weights_as(model, torch.float32) == 0, "already stored as float32"


def test_an_evaluation_leaves_the_4bit_weights_and_the_gradients_as_they_were(ft_tiny_model_dir):
    """bitsandbytes repacks a 4-bit weight for CPU inference on its first eval-mode forward without grad (on
    CPUs with AVX512-BF16); the adapter's gradients after an evaluation were then wrong. The lora plugin
    keeps the training layout."""
    import torch
    from transformers import AutoModelForCausalLM

    ctx = load_context(make_config(ft_tiny_model_dir, qlora={"compute_dtype": "float32"}, lora={"r": 4, "dropout": 0.0}))
    base = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, **ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg))
    model = ctx.pm.call("ft_apply_adapter", cfg=ctx.cfg, model=base)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter: gradients reach lora_A and the base's inputs
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 40]])

    def gradients():
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(ids, labels=ids)
    after = gradients()
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if hasattr(m, "quant_state"))


# -- (b) through `ft run`: 4-bit layers, and the loss falls --------------------------------------


class CaptureRun:
    """A test plugin that looks at the model before training and the trainer after it."""

    def __init__(self):
        self.layer_types = set()
        self.log_history = []
        self.optimizer = None
        self.lm_head_state = {}

    @hookimpl
    def ft_before_train(self, model):
        self.layer_types = {type(m.base_layer).__module__ + "." + type(m.base_layer).__name__
                            for m in model.modules() if hasattr(m, "base_layer")}

    @hookimpl
    def ft_after_train(self, trainer):
        self.log_history = list(trainer.state.log_history)
        optimizer = trainer.optimizer
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.numel() >= 4096:  # bitsandbytes keeps 8-bit state for large tensors only
                    self.lm_head_state = dict(self.optimizer.state[p])

    def losses(self):
        return [e["loss"] for e in self.log_history if "loss" in e]


def train(tmp_path, model_dir, data, **overrides):
    from ft.run import run
    from ft.tools.testing import registered_plugin, write_config

    config = write_config(tmp_path / "config.yaml", base_model=model_dir, dataset=data, **overrides)
    capture = CaptureRun()
    with registered_plugin(capture, "capture_run"):
        run(config)
    return capture


def test_qlora_trains_4bit_layers_and_the_loss_falls(ft_tiny_model_dir, chat_jsonl, tmp_path):
    capture = train(
        tmp_path, ft_tiny_model_dir, chat_jsonl, plugins=["lora", "qlora"], max_steps=5, learning_rate=1e-2,
        lr_scheduler="constant", micro_batch_size=4, lora={"r": 8, "alpha": 16, "dropout": 0.0},
        qlora={"compute_dtype": "float32"}, save_steps=4,
    )
    assert capture.layer_types == {"bitsandbytes.nn.modules.Linear4bit"}
    losses = capture.losses()
    assert len(losses) == 5
    assert losses[-1] < losses[0] - 0.05, losses
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "base_quantization.json").is_file()
    # a checkpoint can be merged or used for inference too: it records the quantization as well
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "checkpoint-4" / "base_quantization.json").read_text())["bnb_4bit_quant_type"] == "nf4"


def test_8bit_optimizer_trains(ft_tiny_model_dir, chat_jsonl, tmp_path):
    import torch

    capture = train(
        tmp_path, ft_tiny_model_dir, chat_jsonl, plugins=["lora"], optimizer="adamw_8bit", max_steps=5,
        learning_rate=1e-2, lr_scheduler="constant", micro_batch_size=4,
        lora={"r": 8, "dropout": 0.0, "modules_to_save": ["lm_head"]},  # lm_head: big enough for 8-bit state
    )
    assert type(capture.optimizer).__module__.startswith("bitsandbytes.optim")
    assert capture.lm_head_state["state1"].dtype == torch.uint8  # 8-bit moments
    losses = capture.losses()
    assert losses[-1] < losses[0] - 0.05, losses
