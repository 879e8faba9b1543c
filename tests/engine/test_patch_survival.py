"""Kernel patches are in effect in training, or the run stops naming the plugin (issue 22, item 15).

transformers >= 5 with the ``kernels`` package "kernelizes" hub-kernel layers (LlamaRMSNorm ...)
at load and again at every train()/eval() switch, which drops a ``forward`` bound on such a module
instance: a kernel plugin's patch was logged as applied and never ran.
"""

from __future__ import annotations

import copy
import inspect
import types

import pytest

from ft import hookimpl
from ft.api import Plugin
from ft.engine.patch_watch import CountingForward, PatchWatch
from ft.kernel.errors import FtError
from ft.kernel.patching import patch_attribute
from ft.tools.testing import assert_patch_survives

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


def bind_counting_forward(module, calls: list):
    """What Liger (and many kernel plugins) do: bind a new ``forward`` on the module instance."""
    original = type(module).forward

    def forward(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    module.forward = types.MethodType(forward, module)


def _load_with_ft(config_path):
    from ft.kernel.context import load_context

    ctx = load_context(config_path)
    pm = ctx.pm
    tokenizer = pm.call("ft_load_tokenizer", cfg=ctx.cfg)
    return pm.call("ft_load_model", cfg=ctx.cfg, kwargs=pm.call("ft_model_kwargs", cfg=ctx.cfg), tokenizer=tokenizer)


# -- the reproduction ---------------------------------------------------------------------------------


def test_a_forward_bound_on_the_final_norm_survives_train_in_a_model_loaded_by_ft(ft_config, ft_dataset):
    """The issue's reproduction: bind a counting forward on model.model.norm, model.train(), forward."""
    model = _load_with_ft(ft_config(dataset=ft_dataset(n=2)))
    norm, calls = model.model.norm, []
    bind_counting_forward(norm, calls)
    model.train()
    model(input_ids=torch.arange(6).reshape(1, 6))
    assert calls == ["LlamaRMSNorm"]
    assert "forward" in norm.__dict__
    assert not model.use_kernels  # ft loads with use_kernels=False


def test_transformers_default_load_drops_it(ft_tiny_model_dir):
    """Why ft turns hub kernels off: with transformers' defaults the bound forward is dropped at train()."""
    model = transformers.AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir)
    if not model.use_kernels:
        pytest.skip("this transformers does not kernelize by default (no `kernels` package)")
    norm, calls = model.model.norm, []
    bind_counting_forward(norm, calls)
    model.train()
    model(input_ids=torch.arange(6).reshape(1, 6))
    assert calls == [] and "forward" not in norm.__dict__


# -- through ft run --------------------------------------------------------------------------------


class NormPatcher:
    """A third-party kernel plugin that binds forward on every RMSNorm instance."""

    PLUGIN = Plugin(feature=True)

    def __init__(self):
        self.calls = []

    @hookimpl
    def ft_patch_model(self, cfg, model):
        from ft.api import PatchRecord

        norms = [m for _, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
        for module in norms:
            bind_counting_forward(module, self.calls)
        return [PatchRecord("normpatch", "LlamaRMSNorm.forward", "counting forward", count=len(norms))]


def test_a_bound_forward_runs_in_training(ft_config, ft_dataset, ft_runner, ft_register_plugin):
    plugin = NormPatcher()
    ft_register_plugin(plugin, "normpatch")
    result = ft_runner.run(ft_config(dataset=ft_dataset(n=8)), "-p", "normpatch").assert_ok()
    assert len(plugin.calls) >= 5  # 2 norms x 2 layers + the final norm, every step
    # the five norms and fused_loss's forward (on by default where it applies)
    assert "kernel patches: all 6 checked patches were in effect after training step 1" in result.log


def test_a_patch_undone_by_hub_kernels_stops_the_run_naming_plugin_and_module(ft_config, ft_dataset, ft_runner,
                                                                              ft_register_plugin):
    plugin = NormPatcher()
    ft_register_plugin(plugin, "normpatch")
    config = ft_config(dataset=ft_dataset(n=8), hf={"use_kernels": True})
    result = ft_runner.run(config, "-p", "normpatch")
    result.assert_error("5 kernel patch(es) were not in effect after training step 1",
                        "plugin 'normpatch': model.norm (LlamaRMSNorm).forward was removed",
                        "hub-kernel layer", "-p no:normpatch")
    assert plugin.calls == []
    assert not (result.output_dir / "model.safetensors").exists()  # nothing saved that claims the patch


class LmHeadPatcher:
    """Binds forward on the LM head; fused_loss (which reads the head's weight) must then step aside."""

    PLUGIN = Plugin(feature=True)

    def __init__(self):
        self.calls = []

    @hookimpl(tryfirst=True)
    def ft_patch_model(self, cfg, model):
        bind_counting_forward(model.lm_head, self.calls)
        return None  # no record: the core still sees and checks the change


def test_fused_loss_does_not_bypass_a_patched_lm_head(ft_config, ft_dataset, ft_runner, ft_register_plugin):
    plugin = LmHeadPatcher()
    ft_register_plugin(plugin, "headpatch")
    ft_runner.run(ft_config(dataset=ft_dataset(n=8)), "-p", "headpatch", "-p", "fused_loss").assert_ok()
    assert plugin.calls and set(plugin.calls) == {"Linear"}


class GlobalThenUndone:
    """A global patch that something else replaces before training: its record's check catches it."""

    PLUGIN = Plugin(feature=True)
    target = types.SimpleNamespace(kernel="original")

    @hookimpl
    def ft_patch_model(self, cfg, model):
        return [patch_attribute(self.target, "kernel", "fast", plugin="globalundone")]

    @hookimpl
    def ft_before_train(self, cfg, trainer, model):
        self.target.kernel = "someone else's"


def test_a_global_patch_replaced_before_training_is_reported(ft_config, ft_dataset, ft_runner, ft_register_plugin):
    ft_register_plugin(GlobalThenUndone(), "globalundone")
    result = ft_runner.run(ft_config(dataset=ft_dataset(n=8)), "-p", "globalundone")
    result.assert_error("plugin 'globalundone': SimpleNamespace.kernel was replaced again after the plugin set it")
    assert GlobalThenUndone.target.kernel == "original"  # the undo still ran


# -- PatchWatch --------------------------------------------------------------------------------------


@pytest.fixture
def tiny(ft_tiny_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, use_kernels=False)


def test_watch_reports_a_forward_in_place_but_never_called(tiny):
    watch = PatchWatch(tiny)
    bind_counting_forward(tiny.lm_head, [])
    [change] = watch.add("p")
    assert change.where == "lm_head (Linear).forward"
    tiny.model(input_ids=torch.arange(4).reshape(1, 4))  # the decoder only: the head is not called
    assert watch.problems() == [("p", "lm_head (Linear).forward is in place but was never called during the "
                                      "training step")]


def test_watch_sees_swapped_modules_and_each_plugin_separately(tiny):
    watch = PatchWatch(tiny)
    bind_counting_forward(tiny.model.norm, [])
    first = watch.add("a")
    tiny.model.layers[0].mlp = copy.deepcopy(tiny.model.layers[0].mlp)
    second = watch.add("b")
    assert [c.where for c in first] == ["model.norm (LlamaRMSNorm).forward"]
    assert [c.where for c in second] == ["model.layers.0.mlp (LlamaMLP), swapped in"]  # not its children
    tiny(input_ids=torch.arange(4).reshape(1, 4))
    assert watch.problems() == []
    watch.verify(1)
    watch.close()
    assert not tiny.model.layers[0].mlp._forward_pre_hooks
    assert not isinstance(tiny.model.norm.__dict__["forward"], CountingForward)  # the plugin's forward again


def test_watch_reports_a_swapped_module_whose_forward_was_replaced_or_that_is_not_called(tiny):
    """What kernelize does on a GPU to a swapped-in subclass of a hub-kernel layer: binds the hub's forward."""
    watch = PatchWatch(tiny)
    tiny.model.norm = type("FastNorm", (type(tiny.model.norm),), {})(tiny.config.hidden_size)
    tiny.model.extra = torch.nn.Linear(2, 2)  # added, and never used by the model
    watch.add("p")
    bind_counting_forward(tiny.model.norm, [])  # someone else's forward on the plugin's module
    tiny(input_ids=torch.arange(4).reshape(1, 4))
    assert watch.problems() == [
        ("p", "model.norm (FastNorm), swapped in: its forward was replaced after the plugin swapped it in, so its "
              "code never ran"),
        ("p", "model.extra (Linear), swapped in was never called during the training step"),
    ]
    assert "FastNorm is a transformers hub-kernel layer ('RMSNorm')" in watch.hints()[0]


def test_counting_forward_keeps_the_signature_and_follows_a_deepcopy(tiny):
    watch = PatchWatch(tiny)
    tiny.forward = types.MethodType(type(tiny).forward, tiny)
    watch.add("p")
    assert "input_ids" in inspect.signature(tiny.forward).parameters  # Trainer and PEFT inspect it
    frozen = copy.deepcopy(tiny)  # a frozen reference model
    assert frozen.__dict__["forward"].__wrapped__.__self__ is frozen  # computes with the copy's weights
    frozen(input_ids=torch.arange(4).reshape(1, 4))
    assert watch.changes[0].counter.calls == 0  # the copy counts on its own


# -- ft.tools.testing.assert_patch_survives ----------------------------------------------------------------


def test_helper_passes_for_a_patch_that_runs(tiny):
    calls = []
    records = assert_patch_survives(tiny, lambda m: bind_counting_forward(m.model.norm, calls))
    assert records == [] and len(calls) == 2  # one call in each of the two steps


def test_helper_fails_for_a_bound_forward_under_hub_kernels(ft_tiny_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir)  # transformers' defaults
    if not model.use_kernels:
        pytest.skip("this transformers does not kernelize by default")
    with pytest.raises(AssertionError, match=r"(?s)after training step 1, 1 patch\(es\).*model\.norm \(LlamaRMSNorm\)"
                                             r"\.forward was removed"):
        assert_patch_survives(model, lambda m: bind_counting_forward(m.model.norm, []), plugin="mine")


def test_helper_fails_for_a_patch_that_changes_nothing(tiny):
    with pytest.raises(AssertionError, match="changed no module"):
        assert_patch_survives(tiny, lambda m: None)


def test_helper_undoes_global_records(tiny):
    ns = types.SimpleNamespace(kernel="original")

    def patch(model):
        bind_counting_forward(model.model.norm, [])
        return [patch_attribute(ns, "kernel", "fast", plugin="p")]

    assert_patch_survives(tiny, patch)
    assert ns.kernel == "original"


def test_verify_raises_one_error_listing_every_plugin(tiny):
    watch = PatchWatch(tiny)
    bind_counting_forward(tiny.model.norm, [])
    watch.add("a")
    tiny.model.norm.__dict__.pop("forward")  # what kernelize does
    with pytest.raises(FtError) as info:
        watch.verify(3)
    text = str(info.value)
    assert "after training step 3" in text and "plugin 'a': model.norm (LlamaRMSNorm).forward was removed" in text
    assert "-p no:a" in text
