"""The lora plugin: what trains, what is saved, and the errors a user sees."""

from __future__ import annotations

import json
import sys

import pytest

from ft import hookimpl
from ft.kernel.context import load_context
from ft.kernel.errors import ConfigError, MissingDependencyError


def make_config(model_dir, plugins=("lora",), **extra):
    return {
        "base_model": str(model_dir),
        "datasets": [{"path": "unused.jsonl", "type": "chat_template"}],
        "plugins": list(plugins),
        "bf16": False,
        **extra,
    }


def apply_lora(model_dir, **lora):
    """Validate a config with the lora section ``lora`` and apply the adapter to a fresh tiny model."""
    from transformers import AutoModelForCausalLM

    ctx = load_context(make_config(model_dir, lora=lora))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return ctx, ctx.pm.call("ft_apply_adapter", cfg=ctx.cfg, model=model)


def problems_of(excinfo) -> str:
    return "\n".join(excinfo.value.problems)


# -- (e) validation errors -------------------------------------------------------------------


def test_rank_must_be_positive(ft_tiny_model_dir, write_yaml):
    config = write_yaml(make_config(ft_tiny_model_dir, lora={"r": 0, "alpha": 16}))
    with pytest.raises(ConfigError) as excinfo:
        load_context(config)
    text = problems_of(excinfo)
    assert f"{config}:" in text and "lora.r: must be a positive integer (got 0)" in text


def test_alpha_must_be_positive(ft_tiny_model_dir):
    with pytest.raises(ConfigError) as excinfo:
        load_context(make_config(ft_tiny_model_dir, lora={"alpha": -1}))
    assert "lora.alpha: must be positive (got -1.0)" in problems_of(excinfo)


def test_target_modules_string_must_be_all_linear(ft_tiny_model_dir):
    with pytest.raises(ConfigError) as excinfo:
        load_context(make_config(ft_tiny_model_dir, lora={"target_modules": "q_proj"}))
    text = problems_of(excinfo)
    assert "lora.target_modules: must be a list of module names, 'all-linear', or a regular expression" in text
    assert "(got 'q_proj')" in text
    assert "target_modules: [q_proj]" in text


def test_empty_target_modules_is_an_error(ft_tiny_model_dir):
    with pytest.raises(ConfigError) as excinfo:
        load_context(make_config(ft_tiny_model_dir, lora={"target_modules": []}))
    assert "lora.target_modules: is empty, so nothing would train" in problems_of(excinfo)


def test_init_from_must_hold_an_adapter(ft_tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_context(make_config(ft_tiny_model_dir, lora={"init_from": str(tmp_path / "nowhere")}))
    assert "lora.init_from: no adapter at" in problems_of(excinfo)
    assert "adapter_config.json missing" in problems_of(excinfo)


def test_unknown_key_in_section_suggests_the_right_one(ft_tiny_model_dir):
    with pytest.raises(ConfigError) as excinfo:
        load_context(make_config(ft_tiny_model_dir, lora={"lora_alpha": 16}))  # axolotl's spelling
    assert "lora.lora_alpha: unknown key. Did you mean 'alpha'?" in problems_of(excinfo)


def test_section_without_selecting_the_plugin(ft_tiny_model_dir):
    with pytest.raises(ConfigError) as excinfo:
        load_context(make_config(ft_tiny_model_dir, plugins=(), lora={"r": 8}))
    assert "Add it to `plugins: [lora]` or pass `-p lora`" in problems_of(excinfo)


def test_target_modules_that_match_nothing_list_real_names(ft_tiny_model_dir):
    with pytest.raises(ConfigError) as excinfo:
        apply_lora(ft_tiny_model_dir, target_modules=["q_proj", "qkv_proj"])
    text = problems_of(excinfo)
    assert "lora.target_modules: qkv_proj match(es) no module of LlamaForCausalLM" in text
    assert "Its linear layers are named: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in text



def test_target_modules_as_a_regular_expression_go_to_peft(ft_tiny_model_dir):
    # axolotl configs (and peft) give one regular expression over whole module paths
    _, model = apply_lora(ft_tiny_model_dir, target_modules=r"model.layers.[\d]+.(self_attn).(q|v)_proj")
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError) as excinfo:
        apply_lora(ft_tiny_model_dir, target_modules=r"layers.[\d]+.(q|v)_proj")  # not a whole path
    assert "the regular expression 'layers.[\\d]+.(q|v)_proj' matches no module path" in problems_of(excinfo)
    with pytest.raises(ConfigError) as excinfo:
        load_context(make_config(ft_tiny_model_dir, lora={"target_modules": "model.(q_proj"}))
    assert "is not a regular expression" in problems_of(excinfo)

def test_modules_to_save_that_match_nothing(ft_tiny_model_dir):
    with pytest.raises(ConfigError) as excinfo:
        apply_lora(ft_tiny_model_dir, modules_to_save=["embeddings"])
    text = problems_of(excinfo)
    assert "lora.modules_to_save: embeddings match(es) no module" in text and "embed_tokens" in text


def test_missing_peft_says_how_to_install(ft_tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"needs peft, which is not installed: pip install 'ft\[lora\]'"):
        load_context(make_config(ft_tiny_model_dir))


# -- applying --------------------------------------------------------------------------------


def test_only_adapter_parameters_require_grad(ft_tiny_model_dir):
    _, model = apply_lora(ft_tiny_model_dir, r=4, target_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_B" in n for n in trainable)
    assert not any("k_proj" in n for n in trainable)
    assert model.peft_config["default"].r == 4


def test_all_linear_adapts_every_linear_layer_but_the_head(ft_tiny_model_dir):
    _, model = apply_lora(ft_tiny_model_dir)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_dora_rslora_and_modules_to_save(ft_tiny_model_dir):
    _, model = apply_lora(ft_tiny_model_dir, r=4, alpha=8, use_dora=True, use_rslora=True, modules_to_save=["lm_head"])
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA's magnitude
    assert any("lm_head.modules_to_save" in n for n in names)  # trained in full
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)


def test_gradient_checkpointing_still_reaches_the_adapter(ft_tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    # reentrant checkpointing (DeepSpeed needs it) drops grads unless the adapter plugin makes the
    # frozen embeddings' output require grad
    kwargs = {"use_reentrant": True}
    ctx = load_context(make_config(ft_tiny_model_dir, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs,
                                   lora={"r": 4}))
    base = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir)
    model = ctx.pm.call("ft_apply_adapter", cfg=ctx.cfg, model=base)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # as the Trainer does, afterwards
    model.train()
    ids = torch.randint(0, 400, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A gets none while B = 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# -- saving and continuing -------------------------------------------------------------------


def randomize_lora_b(model, seed=0):
    """LoRA starts with B = 0 (no effect); give it one, as training would."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_save_writes_the_peft_layout(ft_tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    ctx, model = apply_lora(ft_tiny_model_dir, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    files = ctx.pm.call("ft_save_weights", cfg=ctx.cfg, trainer=None, model=model, output_dir=str(out))
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["base_model_name_or_path"] == str(ft_tiny_model_dir.resolve())
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)  # the adapter only, not the base
    assert not (out / "model.safetensors").exists() and not (out / "base_quantization.json").exists()


def test_full_fine_tuning_is_left_to_another_saver(ft_tiny_model_dir, tmp_path):
    from ft_plugins import lora
    from transformers import AutoModelForCausalLM

    ctx = load_context(make_config(ft_tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir)
    assert lora.ft_save_weights(cfg=ctx.cfg, trainer=None, model=model, output_dir=str(tmp_path)) is None


def test_init_from_continues_an_adapter(ft_tiny_model_dir, tmp_path):
    import torch

    ctx, first = apply_lora(ft_tiny_model_dir, r=4, target_modules=["q_proj"])
    randomize_lora_b(first)
    ctx.pm.call("ft_save_weights", cfg=ctx.cfg, trainer=None, model=first, output_dir=str(tmp_path / "first"))

    _, second = apply_lora(ft_tiny_model_dir, init_from=str(tmp_path / "first"))
    assert second.peft_config["default"].r == 4  # the adapter's own settings, not the section defaults
    trained = dict(first.named_parameters())
    loaded = {n: p for n, p in second.named_parameters() if "lora_" in n}
    assert loaded and all(p.requires_grad for p in loaded.values())
    for name, p in loaded.items():
        assert torch.equal(p, trained[name]), name


# -- (a) through `ft run`: only the adapter trains ---------------------------------------------


class CaptureTrained:
    """A test plugin that keeps the trained model and the trainer's log."""

    def __init__(self):
        self.model = None
        self.log_history = []

    @hookimpl
    def ft_after_train(self, trainer):
        self.model = trainer.accelerator.unwrap_model(trainer.model)
        self.log_history = list(trainer.state.log_history)


def test_training_changes_the_adapter_and_leaves_the_base_bit_identical(ft_tiny_model_dir, chat_jsonl, tmp_path):
    import torch
    from safetensors.torch import load_file

    from ft.run import run
    from ft.tools.testing import registered_plugin, write_config

    config = write_config(
        tmp_path / "config.yaml", base_model=ft_tiny_model_dir, dataset=chat_jsonl, plugins=["lora"], max_steps=3,
        learning_rate=5e-3, lora={"r": 4, "alpha": 8, "target_modules": "all-linear"},
    )
    capture = CaptureTrained()
    with registered_plugin(capture, "capture_trained"):
        result = run(config)

    original = load_file(ft_tiny_model_dir / "model.safetensors")
    trained = {k: v for k, v in capture.model.state_dict().items()}
    base_keys = [k for k in trained if "lora_" not in k]
    assert len(base_keys) == len(original)
    for key in base_keys:
        plain = key.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(trained[key], original[plain]), f"base weight {plain} changed"
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "the adapter did not train"

    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert str(out / "adapter_model.safetensors") in result.files
    saved = load_file(out / "adapter_model.safetensors")
    some_key = next(k for k in saved if "lora_B" in k)
    in_model = next(v for k, v in trained.items() if "lora_B" in k and k.replace(".default", "") == some_key)
    assert torch.equal(saved[some_key], in_model)


def write_pairs(path) -> str:
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus {a}?"}],
             "chosen": [{"role": "assistant", "content": f"It is {a + a}."}],
             "rejected": [{"role": "assistant", "content": f"It is {a + a + 1}."}]} for a in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_seed_seeds_the_adapter_initialisation(ft_tiny_model_dir, chat_jsonl, tmp_path, method):
    """Two runs of one config give the same run: the adapter's random init (lora_A) follows ``seed``, whatever
    the process did before (the Trainer seeds only after the adapter is built). Another seed, another init."""
    import torch
    from safetensors.torch import load_file

    from ft.run import run
    from ft.tools.testing import write_config

    extra = {"method": "dpo", "datasets": [{"path": write_pairs(tmp_path / "pairs.jsonl"), "type": "preference"}],
             "sequence_len": 64} if method == "dpo" else {"dataset": chat_jsonl}

    def one_run(name: str, seed: int) -> tuple[float, dict]:
        config = write_config(
            tmp_path / f"{name}.yaml", base_model=ft_tiny_model_dir, plugins=["lora"],
            max_steps=2, logging_steps=1, learning_rate=5e-3, seed=seed, output_dir=str(tmp_path / name),
            lora={"r": 4, "alpha": 8, "target_modules": "all-linear"}, **extra,
        )
        run(config)
        history = json.loads((tmp_path / name / "metrics.json").read_text())["history"]
        return history[0]["grad_norm"], load_file(tmp_path / name / "adapter_model.safetensors")

    torch.manual_seed(123)  # the state an earlier run (or anything else) leaves behind
    grad_a, weights_a = one_run("a", seed=7)
    torch.rand(5)
    grad_b, weights_b = one_run("b", seed=7)
    assert grad_a == grad_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    if method == "sft":
        grad_c, _ = one_run("c", seed=8)
        assert grad_c != grad_a, "the seed decides the init"
