"""liger: refused with one sentence where it cannot run; its module-level patches never outlive a run."""

from __future__ import annotations

import copy

import pytest
import torch
from ft_plugins import liger

from ft.errors import FtError, MissingDependencyError


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
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


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
