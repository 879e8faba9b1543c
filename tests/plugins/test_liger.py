"""liger: refused with one sentence where it cannot run; its module-level patches never outlive a run."""

from __future__ import annotations

import copy

import pytest
import torch
from ft_plugins import liger

from ft.kernel.errors import FtError, MissingDependencyError


def _module_state(module):
    """Every module-level name of ``module`` and the attributes of its classes, by identity.

    transformers memoises some class properties on first use (``*_cached_value``); those are not
    patches, and whether they exist depends on which test built a model first, so they are left out.
    """
    state = {("module", k): id(v) for k, v in vars(module).items()}
    for name, value in vars(module).items():
        if isinstance(value, type) and value.__module__ == module.__name__:
            state.update({(name, k): id(v) for k, v in vars(value).items() if not k.endswith("_cached_value")})
    return state


@pytest.fixture
def modeling_llama():
    from transformers.models.llama import modeling_llama

    return modeling_llama


@pytest.fixture
def tiny_model(ft_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, dtype=torch.float32)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text.strip(), text
    return text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_selected_on_cpu_stops_with_one_sentence(ft_config, ft_dataset, ft_runner, modeling_llama):
    before = _module_state(modeling_llama)
    result = ft_runner.run(ft_config(dataset=ft_dataset()), "-p", "liger")
    result.assert_error("no CUDA GPU", "deselect liger")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: liger: Liger kernels are Triton GPU kernels")
    assert "Traceback" not in result.output
    assert _module_state(modeling_llama) == before


def test_missing_liger_kernel_says_how_to_install(tiny_model, monkeypatch):
    monkeypatch.setattr(liger, "is_installed", lambda name: name != "liger_kernel")
    monkeypatch.setattr(liger, "cuda_available", lambda: True)
    with pytest.raises(MissingDependencyError) as info:
        liger.check_usable(tiny_model)
    assert "pip install 'ft[liger]'" in _one_line(info.value)


def test_unsupported_model_is_named(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.setattr(liger, "cuda_available", lambda: True)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(FtError) as info:
        liger.check_usable(model)
    text = _one_line(info.value)
    assert "'gpt2'" in text and "supported: llama" in text


def _pretend_liger_is_installed(monkeypatch):
    real = liger.is_installed
    monkeypatch.setattr(liger, "is_installed", lambda name: name == "liger_kernel" or real(name))


def _liger_like_apply(calls):
    """Patches the way liger-kernel's ``apply_liger_kernel_to_llama(model=...)`` does, with CPU-safe
    equivalents: module-level function and classes rebound, the instance's norms and forward bound."""
    from types import MethodType

    from transformers.models.llama import modeling_llama

    def apply(*, rope, cross_entropy, fused_linear_cross_entropy, rms_norm, swiglu, model):
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, flce=fused_linear_cross_entropy,
                          rms_norm=rms_norm, swiglu=swiglu))
        original_rope = modeling_llama.apply_rotary_pos_emb

        def rope_fn(*args, **kwargs):
            calls.append("rope")
            return original_rope(*args, **kwargs)

        rope_fn.__module__ = "liger_kernel.transformers.rope"
        modeling_llama.apply_rotary_pos_emb = rope_fn
        modeling_llama.LlamaRMSNorm = type("LigerRMSNorm", (modeling_llama.LlamaRMSNorm,), {})
        modeling_llama.LlamaMLP = type("LigerSwiGLUMLP", (modeling_llama.LlamaMLP,), {})
        forward = type(model).forward

        def lce_forward(self, *args, **kwargs):
            return forward(self, *args, **kwargs)

        lce_forward.__module__ = "liger_kernel.transformers.model.llama"
        model.forward = MethodType(lce_forward, model)

    return apply


def test_run_undoes_module_level_patches(ft_config, ft_dataset, ft_runner, modeling_llama, monkeypatch):
    calls = []
    monkeypatch.setattr(liger, "cuda_available", lambda: True)
    _pretend_liger_is_installed(monkeypatch)
    monkeypatch.setattr(liger, "liger_apply_function", lambda model_type: _liger_like_apply(calls))
    before = _module_state(modeling_llama)

    result = ft_runner.run(ft_config(dataset=ft_dataset(), liger={"swiglu": False}), "-p", "liger").assert_ok()

    assert calls[0] == dict(rope=True, cross_entropy=False, flce=True, rms_norm=True, swiglu=False)
    assert "rope" in calls  # training ran with the patched function
    assert "modeling_llama.apply_rotary_pos_emb" in result.log and "undone at end of run" in result.log
    assert _module_state(modeling_llama) == before  # nothing leaks out of the run

    calls.clear()
    ft_runner.run(ft_config(name="plain.yaml", dataset=ft_dataset(), output_dir=str(result.output_dir) + "-plain"))
    assert calls == []  # a later run without liger does not go through Liger's functions


def test_patch_records_name_every_global_change_and_undo_restores_them(tiny_model, modeling_llama, monkeypatch):
    calls = []
    monkeypatch.setattr(liger, "cuda_available", lambda: True)
    _pretend_liger_is_installed(monkeypatch)
    monkeypatch.setattr(liger, "liger_apply_function", lambda model_type: _liger_like_apply(calls))
    before = _module_state(modeling_llama)
    cfg = type("Cfg", (), {"section": lambda self, name: liger.LigerOptions()})()  # no liger: section: defaults

    records = liger.ft_patch_model(cfg, tiny_model)

    global_targets = sorted(r.target for r in records if r.undo)
    assert global_targets == [
        "transformers.models.llama.modeling_llama.LlamaMLP",
        "transformers.models.llama.modeling_llama.LlamaRMSNorm",
        "transformers.models.llama.modeling_llama.apply_rotary_pos_emb",
    ]
    instance = [r for r in records if not r.undo]
    assert [r.target for r in instance] == ["LlamaForCausalLM.forward"]
    for record in reversed(records):
        if record.undo:
            record.undo()
    assert _module_state(modeling_llama) == before


@pytest.mark.gpu
def test_gpu_loss_and_gradients_match_the_unpatched_model(tiny_model, modeling_llama):
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    model = tiny_model.cuda().train()
    patched = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 96), device="cuda")
    labels = ids.clone()
    labels[:, :10] = -100

    out = model(input_ids=ids, labels=labels)
    out.loss.backward()

    before = _module_state(modeling_llama)
    cfg = type("Cfg", (), {"section": lambda self, name: liger.LigerOptions()})()  # no liger: section: defaults
    records = liger.ft_patch_model(cfg, patched)
    try:
        assert any(r.undo for r in records)
        out_p = patched(input_ids=ids, labels=labels)
        out_p.loss.backward()
    finally:
        for record in reversed(records):
            if record.undo:
                record.undo()
    assert _module_state(modeling_llama) == before

    assert out_p.loss.item() == pytest.approx(out.loss.item(), rel=1e-4)
    grads = dict(model.named_parameters())
    for name, p in patched.named_parameters():
        ref = grads[name].grad
        assert (p.grad - ref).norm() <= 1e-3 * ref.norm() + 1e-6, name


# -- Liger's instance patches in training, with a CPU stand-in of liger-kernel ---------------------

# A stand-in of liger-kernel 0.6's llama path that patches exactly as the real one does (module-level
# names rebound; forward bound on the norm and MLP instances with ``module.__dict__["forward"] =
# fn.__get__(module)``; the model's forward replaced) but computes in PyTorch on the CPU and counts calls.
FAKE_LIGER = {
    "liger_kernel/__init__.py": "",
    "liger_kernel/transformers/__init__.py": "",
    "liger_kernel/transformers/calls.py": "CALLS = []\n",
    "liger_kernel/transformers/rms_norm.py": '''
import torch
from liger_kernel.transformers.calls import CALLS


class LigerRMSNorm(torch.nn.Module):
    def forward(self, hidden_states):
        CALLS.append("rms_norm")
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(hidden_states.dtype)

    def extra_repr(self):
        return "liger"
''',
    "liger_kernel/transformers/swiglu.py": '''
import torch
from liger_kernel.transformers.calls import CALLS


class LigerSwiGLUMLP(torch.nn.Module):
    def forward(self, x):
        CALLS.append("swiglu")
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
''',
    "liger_kernel/transformers/monkey_patch.py": '''
from types import MethodType

from liger_kernel.transformers.calls import CALLS
from liger_kernel.transformers.rms_norm import LigerRMSNorm
from liger_kernel.transformers.swiglu import LigerSwiGLUMLP


def _bind_method_to_module(module, method_name, new_method):
    module.__dict__[method_name] = new_method.__get__(module, module.__class__)


def _patch_rms_norm_module(module):
    module.variance_epsilon = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or 1e-6
    _bind_method_to_module(module, "forward", LigerRMSNorm.forward)
    _bind_method_to_module(module, "extra_repr", LigerRMSNorm.extra_repr)


def liger_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    CALLS.append("rope")
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return __import__("torch").cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def lce_forward(self, *args, **kwargs):
    CALLS.append("lce")
    return type(self).forward(self, *args, **kwargs)


def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                swiglu=True, model=None):
    from transformers.models.llama import modeling_llama

    if rope:
        modeling_llama.apply_rotary_pos_emb = liger_rotary_pos_emb
    if rms_norm:
        modeling_llama.LlamaRMSNorm = LigerRMSNorm
    if swiglu:
        modeling_llama.LlamaMLP = LigerSwiGLUMLP
    if fused_linear_cross_entropy:
        model.forward = MethodType(lce_forward, model)
    base_model = getattr(model, model.base_model_prefix, model)
    if rms_norm:
        _patch_rms_norm_module(base_model.norm)
    for decoder_layer in base_model.layers:
        if swiglu:
            _bind_method_to_module(decoder_layer.mlp, "forward", LigerSwiGLUMLP.forward)
        if rms_norm:
            _patch_rms_norm_module(decoder_layer.input_layernorm)
            _patch_rms_norm_module(decoder_layer.post_attention_layernorm)
''',
}


@pytest.fixture
def fake_liger(tmp_path, monkeypatch):
    """liger-kernel's CPU stand-in importable as ``liger_kernel``; returns its call list."""
    import importlib
    import sys

    for rel, code in FAKE_LIGER.items():
        path = tmp_path / "site" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "liger_kernel" or m.startswith("liger_kernel.")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()
    monkeypatch.setattr(liger, "cuda_available", lambda: True)
    yield importlib.import_module("liger_kernel.transformers.calls").CALLS
    for name in [m for m in sys.modules if m == "liger_kernel" or m.startswith("liger_kernel.")]:
        del sys.modules[name]


def test_liger_norms_and_mlps_run_in_training(fake_liger, ft_config, ft_dataset, ft_runner, modeling_llama):
    before = _module_state(modeling_llama)
    result = ft_runner.run(ft_config(dataset=ft_dataset(n=8), max_steps=1), "-p", "liger").assert_ok()
    # 5 norms, 2 MLPs, the forward and the rope in each of the 2 layers, for the one step
    assert fake_liger.count("rms_norm") == 5 and fake_liger.count("swiglu") == 2
    assert fake_liger.count("lce") == 1 and fake_liger.count("rope") == 2
    assert "[liger] LlamaRMSNorm.forward x5 -> liger_kernel.transformers.rms_norm.LigerRMSNorm.forward" in result.log
    # every bound forward (5 norms, 2 MLPs, the model) and the 3 module-level names
    assert "kernel patches: all 11 checked patches were in effect after training step 1" in result.log
    assert _module_state(modeling_llama) == before


def test_liger_fails_loudly_when_hub_kernels_drop_its_norms(fake_liger, ft_config, ft_dataset, ft_runner,
                                                            monkeypatch):
    """Without ft's loader fix (transformers' default use_kernels=True) Liger's RMSNorm never runs: the run
    stops after the first step and names liger and each norm."""
    from ft_plugins import hf

    from ft import hookimpl

    ft_kwargs = hf.ft_model_kwargs

    @hookimpl
    def transformers_default_kwargs(cfg):
        kwargs = ft_kwargs(cfg)
        kwargs.pop("use_kernels")
        return kwargs

    monkeypatch.setattr(hf, "ft_model_kwargs", transformers_default_kwargs)
    result = ft_runner.run(ft_config(dataset=ft_dataset(n=8), max_steps=1), "-p", "liger")
    result.assert_error("5 kernel patch(es) were not in effect after training step 1",
                        "plugin 'liger': model.norm (LlamaRMSNorm).forward was removed",
                        "plugin 'liger': model.layers.1.post_attention_layernorm (LlamaRMSNorm).forward",
                        "hub-kernel layer", "-p no:liger")
    assert "rms_norm" not in fake_liger and "swiglu" in fake_liger  # the MLPs are no hub-kernel layers


def test_hub_kernels_with_liger_rms_norm_are_refused(ft_config, ft_dataset, ft_runner):
    config = ft_config(dataset=ft_dataset(n=2), hf={"use_kernels": True})
    ft_runner.validate(config, "-p", "liger").assert_error("hf.use_kernels", "liger's RMSNorm", "rms_norm: false")
    ft_runner.validate(config, "-p", "liger", "--set", "liger.rms_norm=false").assert_ok()
