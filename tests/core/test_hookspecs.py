"""The hook specs are the contract: every hook documents its parameters, return and mode."""

from __future__ import annotations

import inspect

import pytest

from ft import hookspecs
from ft.plugins import hook_names

HOOKS = hook_names()


def test_there_are_hooks_for_every_phase():
    source = inspect.getsource(hookspecs)
    for phase in ("registration", "commands", "tokenizer", "data", "model", "trainer", "saving"):
        assert f"# {phase}\n" in source, f"no banner for phase {phase}"
    assert {"ft_load_model", "ft_apply_adapter", "ft_pack", "ft_patch_model", "ft_save_weights"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_docstring_names_every_parameter_return_and_mode(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    assert doc, f"{name} has no docstring"
    assert "Called:" in doc, f"{name}: docstring does not say when it is called"
    for param in inspect.signature(fn).parameters:
        assert f"{param}:" in doc, f"{name}: docstring does not describe parameter '{param}'"
    assert "Returns:" in doc, f"{name}: docstring has no return contract"
    opts = fn.ft_spec
    mode = "firstresult" if opts.get("firstresult") else "all"
    assert f"Mode: {mode}." in doc, f"{name}: docstring must state 'Mode: {mode}.'"


@pytest.mark.parametrize("name", HOOKS)
def test_hooks_are_typed(name):
    sig = inspect.signature(getattr(hookspecs, name))
    for param in sig.parameters.values():
        assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name}) has no type"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name} has no return type"
