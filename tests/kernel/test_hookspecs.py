"""The hook specs are the contract: every hook documents its parameters, return and mode."""

from __future__ import annotations

import inspect

import pytest

from ft import hookspecs
from ft.kernel.hooks import hook_names

HOOKS = hook_names()


@pytest.mark.usefixtures("ft_one_torch_thread")
def test_specs_are_declared_in_the_order_a_run_calls_them(ft_config, ft_dataset, ft_runner, ft_hook_recorder):
    """hookspecs.py reads as the pipeline: a real `ft run` first calls its hooks in declaration order.
    The registration hooks are one block (declared first, called together when the plugins load, in no
    order that matters)."""
    declared = [name for name in vars(hookspecs) if name in HOOKS]  # module order = order of definition
    registration = {h for h in HOOKS if h == "ft_add_config" or h.startswith("ft_register_")}
    assert max(map(declared.index, registration)) < min(declared.index(h) for h in set(HOOKS) - registration)

    # lora and packing implement the adapter, packing and collator hooks, so the run reaches them too
    ft_runner.run(ft_config(dataset=ft_dataset(n=8), max_steps=1, plugins=["lora", "packing"])).assert_ok()
    called = [h for h in ft_hook_recorder.hooks() if h in HOOKS]  # each hook at its first call
    position = {h: -1 if h in registration else declared.index(h) for h in called}
    assert called == sorted(called, key=position.get), \
        f"a run calls the hooks in another order than hookspecs.py declares them: {called}"
    # every phase of the pipeline is reached (registration, tokenizer, data, model, trainer, saving)
    assert {"ft_add_config", "ft_validate_config", "ft_load_tokenizer", "ft_load_dataset", "ft_pack", "ft_load_model",
            "ft_patch_model", "ft_apply_adapter", "ft_collator", "ft_trainer_args", "ft_before_train",
            "ft_save_weights", "ft_after_train"} <= set(called), called


@pytest.mark.parametrize("name", HOOKS)
def test_docstring_names_every_parameter_return_and_mode(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    assert doc, f"{name} has no docstring"
    assert "Called:" in doc, f"{name}: docstring does not say when it is called"
    for param in inspect.signature(fn).parameters:
        assert f"{param}:" in doc, f"{name}: docstring does not describe parameter '{param}'"
    assert "Returns:" in doc, f"{name}: docstring has no return contract"
    assert "Mode:" not in doc, f"{name}: the mode is declared once, in @spec(...), not restated in the docstring"


@pytest.mark.parametrize("name", HOOKS)
def test_hooks_are_typed(name):
    sig = inspect.signature(getattr(hookspecs, name))
    for param in sig.parameters.values():
        assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name}) has no type"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name} has no return type"
