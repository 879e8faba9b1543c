"""One place per hook: the declaration in ft/hookspecs.py drives the one generic caller.

A new hook is added by editing hookspecs.py alone: its mode, result check and (for a registration
hook) its registry come from the declaration; every call site in the code names a declared hook
with the declared parameters.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from ft import PluginError, hookimpl, hookspecs
from ft.kernel import spec as specs
from ft.kernel.hooks import HookCaller, hook_names
from ft.kernel.plugins import PluginManager

REPO = Path(__file__).resolve().parents[2]


def _add_hook(monkeypatch, name, fn):
    """A hook declared in hookspecs.py (the test adds it to the module, as an edit of the file would)."""
    fn.__name__ = name
    monkeypatch.setattr(hookspecs, name, fn, raising=False)
    return fn


def test_a_new_merge_hook_works_from_its_declaration_alone(monkeypatch):
    def ft_new_kwargs(cfg):
        """New."""

    _add_hook(monkeypatch, "ft_new_kwargs", specs.spec(specs.MERGE, specs.dict_of("new keyword"))(ft_new_kwargs))

    class A:
        @hookimpl
        def ft_new_kwargs(self, cfg):
            return {"x": 1}

    class B:
        @hookimpl
        def ft_new_kwargs(self, cfg):
            return {"x": 2}

    assert "ft_new_kwargs" in hook_names()
    pm = PluginManager(entry_points=[], extra_plugins=[("a", A())])
    assert pm.call("ft_new_kwargs", cfg=None) == {"x": 1}
    pm = PluginManager(entry_points=[], extra_plugins=[("a", A()), ("b", B())])
    with pytest.raises(PluginError, match=r"new keyword 'x' is set to [12] by plugin '[ab]' .* and to [12] by plugin '[ab]'"):
        pm.call("ft_new_kwargs", cfg=None)


def test_a_new_registration_hook_gets_its_registry_field(monkeypatch):
    from ft.kernel.context import Registries
    from ft.kernel.registry import OptimizerRegistry

    def ft_register_widgets(register):
        """Widgets."""

    _add_hook(monkeypatch, "ft_register_widgets",
              specs.spec(specs.REGISTER, registry="ft.kernel.registry:OptimizerRegistry", into="widgets")(ft_register_widgets))

    class W:
        @hookimpl
        def ft_register_widgets(self, register):
            register.add("spanner", "adamw_torch")

    pm = PluginManager(entry_points=[], extra_plugins=[("w", W())])
    regs = Registries()
    pm.register_all(regs)
    assert isinstance(regs.widgets, OptimizerRegistry)
    assert regs.widgets.get("spanner").plugin == "w"


@pytest.mark.parametrize(("hook", "kwargs", "bad", "expected"), [
    ("ft_load_trained", {"run_dir": None, "dtype": None}, "model", "a (model, tokenizer) tuple or None"),
    ("ft_validate_config", {"cfg": None}, "one problem", "a list of problem strings or None"),
    ("ft_data_fingerprint", {"cfg": None, "entry": None}, 3, "a string or None"),
    ("ft_model_kwargs", {"cfg": None}, ["dtype"], "a dict of model keyword arguments or None"),
    ("ft_patch_model", {"cfg": None, "model": None}, ["not a record"], "a list of ft.api.PatchRecord or None"),
    ("ft_collator", {"cfg": None, "tokenizer": None, "method": None}, "not callable", "a callable"),
    ("ft_before_train", {"cfg": None, "trainer": None, "model": None}, True, "None"),
    ("ft_save_weights", {"cfg": None, "trainer": None, "model": None, "output_dir": "x"}, "a.bin", "a list of the files"),
])
def test_every_mode_checks_what_a_plugin_returns_and_names_it(hook, kwargs, bad, expected):
    import re

    plugin = type("Bad", (), {})()
    # a hookimpl takes the spec's parameters by name
    params = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    ns: dict = {}
    exec(f"def {hook}(self, {', '.join(params)}):\n    return BAD", {"BAD": bad}, ns)
    setattr(type(plugin), hook, hookimpl(ns[hook]))
    pm = PluginManager(entry_points=[], extra_plugins=[("bad", plugin)])
    with pytest.raises(PluginError, match=rf"plugin 'bad' returned .* from {hook} .*expects {re.escape(expected)}"):
        list(pm.each(hook, **kwargs)) if pm.spec(hook).mode == specs.EACH else pm.call(hook, **kwargs)


def test_a_required_first_hook_says_nobody_answered():
    pm = PluginManager(entry_points=[], extra_plugins=[])
    with pytest.raises(Exception, match="no active plugin returned a tokenizer from ft_load_tokenizer"):
        pm.call("ft_load_tokenizer", cfg=None)


def test_every_hook_is_declared_with_a_mode_and_a_check():
    for name in hook_names():
        declared = getattr(hookspecs, name).ft_hook
        assert declared.mode in specs.MODES
        assert isinstance(declared.returns, specs.Returns)
        assert declared.firstresult == bool(getattr(hookspecs, name).ft_spec.get("firstresult"))
        if declared.mode == specs.REGISTER:
            assert declared.new_registry() is not None


def _call_sites():
    """Every ``<x>.call("ft_...", ...)``, ``.first(...)``, ``.each(...)`` in src/, plugins/, bench/ and contrib/."""
    roots = [REPO / "src", REPO / "plugins", REPO / "bench", REPO / "contrib", REPO / "tests"]
    for root in roots:
        for path in root.rglob("*.py"):
            if "build" in path.parts or ".venv" in str(path):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("call", "first", "each") and node.args
                        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                        and node.args[0].value.startswith("ft_")):
                    yield path, node


def test_every_call_site_names_a_declared_hook_with_its_parameters():
    sites = list(_call_sites())
    assert len(sites) > 20  # the pipeline, the data preparation, the CLI, plugins and tests
    test_only = {"ft_new_kwargs"}
    for path, node in sites:
        hook = node.args[0].value
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if hook in test_only:
            continue
        assert hook in hook_names(), f"{where}: calls {hook}, which ft/hookspecs.py does not declare"
        params = set(inspect.signature(getattr(hookspecs, hook)).parameters)
        given = {kw.arg for kw in node.keywords if kw.arg}
        assert given <= params, f"{where}: {hook} has no parameter(s) {sorted(given - params)}"
        if not any(kw.arg is None for kw in node.keywords):  # no **kwargs: every parameter given
            assert given == params, f"{where}: {hook} is called without {sorted(params - given)}"


def test_there_is_one_caller():
    import ft

    src = Path(ft.__file__).parent
    assert not (src / "calls.py").exists()
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert ".calls." not in text.replace("recorder.calls", "").replace("self.calls", ""), path
        assert "all_hooks" not in text and "_HookFacade" not in text, path
    assert issubclass(PluginManager, HookCaller)
