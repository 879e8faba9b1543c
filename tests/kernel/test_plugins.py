"""Plugin discovery, selection and failure handling, through real entry points.

A throwaway distribution (``ft-test-plugins``) is written to a temporary directory as a
dist-info with an ``entry_points.txt``; the CLI runs in a subprocess with that directory on
PYTHONPATH, so discovery goes through importlib.metadata exactly as for pip-installed plugins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ft import hookimpl
from ft.api import Plugin
from ft.kernel.errors import PluginError
from ft.tools.testing import install_distribution

PLUGINS = {
    "ftt_good": '''
        """A well-behaved third-party feature plugin."""
        from pydantic import BaseModel, ConfigDict, Field
        from ft import hookimpl
        from ft.api import Plugin
        PLUGIN = Plugin(feature=True)

        class Section(BaseModel):
            model_config = ConfigDict(extra="forbid")
            level: int = Field(1, description="How good.")

        @hookimpl
        def ft_add_config(registry):
            registry.add("good", Section)
    ''',
    "ftt_import_error": '''
        raise RuntimeError("boom at import")
    ''',
    "ftt_bad_hook": '''
        from ft import hookimpl

        @hookimpl
        def ft_load_modle(cfg):
            return None
    ''',
    "ftt_bad_args": '''
        from ft import hookimpl

        @hookimpl
        def ft_load_model(cfg, kwargz):
            return None
    ''',
    "ftt_raises": '''
        from ft import hookimpl

        from ft.api import Plugin
        PLUGIN = Plugin(feature=True)

        @hookimpl
        def ft_validate_config(cfg):
            raise ValueError("something inside the plugin broke")
    ''',
    "ftt_sentinel": '''
        import os
        open(os.environ["FTT_SENTINEL"], "w").write("imported")
    ''',
    "ftt_undecorated": '''
        def ft_load_model(cfg, kwargs, tokenizer):  # forgot @hookimpl
            return None
    ''',
    "ftt_bad_registration": '''
        from ft import hookimpl

        from ft.api import Plugin
        PLUGIN = Plugin(feature=True)

        @hookimpl
        def ft_register_formats(register):
            raise KeyError("no formats today")
    ''',
    "ftt_deep_error": '''
        from ft import hookimpl

        from ft.api import Plugin
        PLUGIN = Plugin(feature=True)

        def _helper(cfg):
            return cfg.no_such_attribute

        @hookimpl
        def ft_validate_config(cfg):
            return _helper(cfg)
    ''',
    "ftt_returns_str": '''
        from ft import hookimpl

        from ft.api import Plugin
        PLUGIN = Plugin(feature=True)

        @hookimpl
        def ft_validate_config(cfg):
            return "one problem as a string"
    ''',
}
ENTRY_POINTS = {
    "good": "ftt_good",
    "import_error": "ftt_import_error",
    "bad_hook": "ftt_bad_hook",
    "bad_args": "ftt_bad_args",
    "raises": "ftt_raises",
    "sentinel": "ftt_sentinel",
    "undecorated": "ftt_undecorated",
    "bad_registration": "ftt_bad_registration",
    "deep_error": "ftt_deep_error",
    "returns_str": "ftt_returns_str",
}


@pytest.fixture
def plugin_env(tmp_path):
    env = install_distribution(tmp_path / "site", "ft-test-plugins", "1.2.3", PLUGINS, ENTRY_POINTS)
    env["FTT_SENTINEL"] = str(tmp_path / "sentinel")
    return env, tmp_path


def ft(env, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ft.cli", *args], env=env, cwd=cwd, capture_output=True, text=True)


def minimal_config(tmp_path: Path, extra: str = "") -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: some/model\ndatasets:\n  - path: {data}\n    type: completion\n{extra}")
    return cfg


def test_plugins_lists_statuses_and_reasons(plugin_env):
    env, _ = plugin_env
    res = ft(env, "plugins", "--json")
    assert res.returncode == 0, res.stderr
    infos = {i["name"]: i for i in json.loads(res.stdout)}
    assert infos["good"]["status"] == "available" and infos["good"]["distribution"] == "ft-test-plugins"
    assert infos["good"]["version"] == "1.2.3" and infos["good"]["hooks"] == ["ft_add_config"]
    assert infos["import_error"]["status"] == "failed"
    assert "boom at import" in infos["import_error"]["error"]
    assert infos["bad_hook"]["status"] == "failed" and "ft_load_modle" in infos["bad_hook"]["error"]
    assert "Did you mean 'ft_load_model'?" in infos["bad_hook"]["error"]
    assert infos["undecorated"]["status"] == "failed" and "lacks @hookimpl" in infos["undecorated"]["error"]
    # a registration hook that raises marks its plugin failed; every other command still works
    assert infos["bad_registration"]["status"] == "failed"
    assert "ft_register_formats raised" in infos["bad_registration"]["error"]
    assert infos["bad_args"]["status"] == "failed" and "kwargz" in infos["bad_args"]["error"]
    assert infos["hf"]["status"] == "essential" and infos["hf"]["distribution"] == "ft"
    assert infos["lora"]["status"] == "available" and infos["lora"]["feature"] is True


def test_broken_plugins_do_not_break_help(plugin_env):
    env, _ = plugin_env
    res = ft(env, "--help")
    assert res.returncode == 0 and "validate" in res.stdout


def test_blocked_plugin_is_never_imported(plugin_env):
    env, tmp = plugin_env
    res = ft(env, "plugins", "-p", "no:sentinel")
    assert res.returncode == 0
    assert not (tmp / "sentinel").exists()
    assert "blocked" in [line.split()[1] for line in res.stdout.splitlines() if line.startswith("sentinel")]
    ft(env, "plugins")
    assert (tmp / "sentinel").exists()


def test_autoload_env_blocks_third_party_but_not_first_party(plugin_env):
    env, tmp = plugin_env
    env = {**env, "FT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    res = ft(env, "plugins", "--json")
    infos = {i["name"]: i for i in json.loads(res.stdout)}
    assert not (tmp / "sentinel").exists()
    assert infos["good"]["status"] == "blocked" and infos["import_error"]["status"] == "blocked"
    assert infos["hf"]["status"] == "essential"
    res = ft(env, "plugins", "--json", "-p", "good")
    assert {i["name"]: i for i in json.loads(res.stdout)}["good"]["status"] == "active"
    # a section of a plugin the environment kept from loading is still an error (only -p no: leaves it unread)
    cfg = minimal_config(tmp, "good: {level: 2}\n")
    res = ft(env, "validate", str(cfg))
    assert res.returncode != 0 and "good: unknown key" in res.stderr, res.stderr
    assert ft(env, "validate", str(cfg), "-p", "no:good").returncode == 0


def test_essential_plugins_cannot_be_blocked(plugin_env):
    env, _ = plugin_env
    res = ft(env, "plugins", "-p", "no:hf")
    assert res.returncode != 0
    assert "essential" in res.stderr and "hf" in res.stderr


def test_selecting_a_failed_plugin_names_its_distribution(plugin_env):
    env, tmp = plugin_env
    res = ft(env, "validate", str(minimal_config(tmp)), "-p", "import_error")
    assert res.returncode != 0
    assert "ft-test-plugins" in res.stderr and "boom at import" in res.stderr


def test_selecting_unknown_plugin_suggests(plugin_env):
    env, tmp = plugin_env
    res = ft(env, "validate", str(minimal_config(tmp)), "-p", "lroa")
    assert res.returncode != 0 and "Did you mean 'lora'" in res.stderr


def test_exception_in_hook_names_plugin_and_hook(plugin_env):
    env, tmp = plugin_env
    res = ft(env, "validate", str(minimal_config(tmp)), "-p", "raises")
    assert res.returncode != 0
    assert "plugin 'raises' failed in hook ft_validate_config" in res.stderr
    assert "something inside the plugin broke" in res.stderr


def test_section_of_unselected_feature_says_how_to_select(plugin_env):
    env, tmp = plugin_env
    cfg = minimal_config(tmp, "good:\n  level: 2\n")
    res = ft(env, "validate", str(cfg))
    assert res.returncode != 0
    assert "plugin 'good', which is not selected" in res.stderr and "-p good" in res.stderr
    res = ft(env, "validate", str(cfg), "-p", "good")
    assert res.returncode == 0, res.stderr
    assert "selected features: good" in res.stdout


def test_hook_call_order(plugin_env):
    env, _ = plugin_env
    res = ft(env, "plugins", "--hook", "ft_register_formats", "--json")
    assert res.returncode == 0, res.stderr
    order = json.loads(res.stdout)["order"]
    assert {"chat_template", "alpaca", "completion", "input_output"} <= set(order)


def test_duplicate_registration_names_both_plugins():
    from ft.kernel.errors import PluginError
    from ft.kernel.registry import FormatRegistry

    reg = FormatRegistry()
    reg.scoped("one").add("fmt", object, lambda *a: None)
    with pytest.raises(PluginError, match="by plugin 'one' and by plugin 'two'"):
        reg.scoped("two").add("fmt", object, lambda *a: None)


def test_model_kwargs_conflict_names_both_plugins():
    from ft import hookimpl
    from ft.kernel.errors import PluginError
    from ft.kernel.plugins import PluginManager

    class A:
        @hookimpl
        def ft_model_kwargs(self, cfg):
            return {"dtype": "bfloat16", "x": 1}

    class B:
        @hookimpl
        def ft_model_kwargs(self, cfg):
            return {"dtype": "float32", "x": 1}

    pm = PluginManager(entry_points=[], extra_plugins=[("a", A()), ("b", B())])
    with pytest.raises(PluginError, match=r"'dtype' is set to .* by plugin '[ab]' \(.*test_plugins.py:\d+\) and "
                                          r"to .* by plugin '[ab]' \(.*test_plugins.py:\d+\)"):
        pm.call("ft_model_kwargs", cfg=None)
    pm2 = PluginManager(entry_points=[], extra_plugins=[("a", A())])
    assert pm2.call("ft_model_kwargs", cfg=None) == {"dtype": "bfloat16", "x": 1}


def test_inactive_feature_hooks_are_not_called():
    from ft import hookimpl
    from ft.kernel.plugins import PluginManager

    class Feature:
        PLUGIN = Plugin(feature=True)

        @hookimpl
        def ft_model_kwargs(self, cfg):
            return {"feature": True}

    pm = PluginManager(entry_points=[], extra_plugins=[("feat", Feature())])
    assert pm.call("ft_model_kwargs", cfg=None) == {}
    pm = PluginManager(select=["feat"], entry_points=[], extra_plugins=[("feat", Feature())])
    assert pm.call("ft_model_kwargs", cfg=None) == {"feature": True}


def test_a_hook_error_shows_the_plugins_own_frames_and_traceback_shows_all(plugin_env):
    env, tmp = plugin_env
    res = ft(env, "validate", str(minimal_config(tmp)), "-p", "deep_error")
    assert res.returncode != 0
    assert "plugin 'deep_error' failed in hook ft_validate_config: AttributeError" in res.stderr
    assert "ftt_deep_error.py:12 in ft_validate_config: return _helper(cfg)" in res.stderr
    assert "ftt_deep_error.py:8 in _helper: return cfg.no_such_attribute" in res.stderr
    assert "-p no:deep_error" in res.stderr and "Traceback (most recent call last)" not in res.stderr
    res = ft(env, "validate", str(minimal_config(tmp)), "-p", "deep_error", "--traceback")
    assert "Traceback (most recent call last)" in res.stderr and "pydantic" in res.stderr


def test_a_hook_that_breaks_its_return_contract_is_named(plugin_env):
    env, tmp = plugin_env
    res = ft(env, "validate", str(minimal_config(tmp)), "-p", "returns_str")
    assert res.returncode != 0
    assert "plugin 'returns_str' returned str 'one problem as a string' from ft_validate_config " \
           f"({tmp / 'site' / 'ftt_returns_str.py'}:7); the hook expects a list of problem strings or None" in res.stderr


def test_validate_and_run_name_plugins_that_failed_to_load(plugin_env):
    env, tmp = plugin_env
    res = ft(env, "validate", str(minimal_config(tmp)))
    assert res.returncode == 0, res.stderr
    assert "warning: plugin 'import_error' (ft-test-plugins 1.2.3) is installed but could not be loaded" in res.stderr
    assert "boom at import" in res.stderr


def test_command_line_no_beats_the_config_and_a_typo_is_an_error(plugin_env):
    env, tmp = plugin_env
    cfg = minimal_config(tmp, "plugins: [good]\n")
    res = ft(env, "validate", str(cfg), "-p", "no:good")
    assert res.returncode == 0, res.stderr
    assert "selected features: none" in res.stdout
    res = ft(env, "validate", str(cfg), "-p", "no:goood")
    assert res.returncode != 0 and "no plugin named 'goood'" in res.stderr and "Did you mean 'no:good'?" in res.stderr


def test_a_plugin_file_loads_without_packaging(plugin_env):
    env, tmp = plugin_env
    (tmp / "my_checks.py").write_text(textwrap.dedent('''
        from ft import hookimpl

        @hookimpl
        def ft_validate_config(cfg):
            return [f"{cfg.where('learning_rate')}: my_checks says no"]
    '''))
    res = ft(env, "validate", str(minimal_config(tmp)), "-p", str(tmp / "my_checks.py"))
    assert res.returncode != 0 and "learning_rate: my_checks says no" in res.stderr
    cfg = minimal_config(tmp, "plugin_paths: [my_checks.py]\n")
    res = ft(env, "validate", str(cfg))  # relative to the config file
    assert res.returncode != 0 and "my_checks says no" in res.stderr
    res = ft(env, "validate", str(minimal_config(tmp)), "-p", str(tmp / "missing.py"))
    assert res.returncode != 0 and "no such plugin file" in res.stderr


def test_trace_shows_every_hook_call(plugin_env):
    env, tmp = plugin_env
    res = ft(env, "validate", str(minimal_config(tmp)), "--trace", "-p", "lora")
    assert res.returncode == 0, res.stderr
    traced = {line.split()[2] for line in res.stderr.splitlines() if line.startswith("[ft trace]")}
    assert {"ft_add_config", "ft_register_formats", "ft_register_methods", "ft_validate_config"} <= traced
    assert "[ft trace] ft_validate_config lora -> list of 0" in res.stderr
    assert "[ft trace] ft_validate_config qlora" not in res.stderr  # an unselected feature is not called


def test_a_wrapper_works_on_an_all_hook_and_sees_each_result():
    from ft import hookimpl
    from ft.kernel.plugins import PluginManager

    seen = []

    class A:
        @hookimpl
        def ft_model_kwargs(self, cfg):
            return {"a": 1}

    class Wrap:
        @hookimpl(wrapper=True)
        def ft_model_kwargs(self, cfg):
            result = yield
            seen.append(result)
            return [{**r, "wrapped": True} for r in result]

    pm = PluginManager(entry_points=[], extra_plugins=[("a", A()), ("wrap", Wrap())])
    assert pm.call("ft_model_kwargs", cfg=None) == {"a": 1, "wrapped": True}
    assert seen == [[{"a": 1}]]
    assert pm.implementers("ft_model_kwargs") == ["a"]


def test_a_callback_that_raises_names_its_plugin(ft_tiny_model_dir, tmp_path):
    from transformers import TrainerCallback

    from ft import hookimpl
    from ft.kernel.errors import PluginHookError
    from ft.run import train
    from ft.tools.testing import registered_plugin, write_config, write_dataset

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("callback exploded")

    class Plugin:
        @hookimpl
        def ft_callbacks(self, cfg):
            return [Boom()]

    data = write_dataset(tmp_path / "d.jsonl", kind="chat", n=4)
    config = write_config(tmp_path / "c.yaml", base_model=ft_tiny_model_dir, datasets=[{"path": str(data), "type": "chat_template"}],
                          max_steps=1)
    from ft.kernel.context import load_context

    with registered_plugin(Plugin(), "boomer"):
        ctx = load_context(config)
        with pytest.raises(PluginHookError) as info:
            train(ctx)
    assert "plugin 'boomer' failed in its callback Boom.on_step_end: RuntimeError: callback exploded" in str(info.value)


# -- one declaration per plugin --------------------------------------------------------------------


@pytest.mark.parametrize(("declares", "says"), [
    ("FT_FEATUER = True", "module global FT_FEATUER is not read by ft; declare the plugin once with "
                          "PLUGIN = ft.api.Plugin(feature=...)"),
    ("FT_FEATURE = True", "module global FT_FEATURE is not read by ft"),
    ("PLUGN = Plugin(feature=True)", "PLUGN looks like a misspelt PLUGIN"),
    ("PLUGIN = Plugin(featuer=True)", "Plugin(...) has no field 'featuer'. Did you mean 'feature'?"),
    ("PLUGIN = Plugin(provides='adapter')", "provides must be a list of names"),
    ("PLUGIN = {'feature': True}", "is not a declaration; write PLUGIN = ft.api.Plugin(...)"),
])
def test_a_misdeclared_plugin_is_an_error_naming_it(tmp_path, declares, says):
    from ft.kernel.plugins import PluginManager

    source = f"from ft import hookimpl\nfrom ft.api import Plugin\n{declares}\n\n@hookimpl\ndef ft_model_kwargs(cfg):\n    return {{}}\n"
    env = install_distribution(tmp_path / "site", "ft-misdeclared", "0.1", {"ftt_misdeclared": source},
                               {"misdeclared": "ftt_misdeclared"})
    import sys

    sys.path.insert(0, env["PYTHONPATH"].split(os.pathsep)[0])
    try:
        import importlib.metadata as md

        eps = [ep for ep in md.entry_points(group="ft") if ep.name == "misdeclared"]
        pm = PluginManager(entry_points=eps)
        info = pm.infos["misdeclared"]
        assert info.status == "failed" and says in info.error and "ftt_misdeclared" in info.error, info.error
        with pytest.raises(PluginError, match="plugin 'misdeclared'.*selected but failed to load"):
            PluginManager(select=["misdeclared"], entry_points=eps)
    finally:
        sys.path.pop(0)
        sys.modules.pop("ftt_misdeclared", None)


def test_the_declaration_sets_feature_capabilities_and_loggers():
    from ft.api import Plugin
    from ft.kernel.plugins import PluginManager

    class Decl:
        PLUGIN = Plugin(feature=True, provides=["adapter"], method_feature="packing", loggers=["noisy"])

        @hookimpl
        def ft_model_kwargs(self, cfg):
            return {"x": 1}

    pm = PluginManager(entry_points=[], extra_plugins=[("decl", Decl())])
    info = pm.infos["decl"]
    assert (info.feature, info.provides, info.method_feature, info.loggers) == (
        True, frozenset({"adapter"}), "packing", ("noisy",))
    assert pm.call("ft_model_kwargs", cfg=None) == {}  # a feature: inactive until selected
    assert PluginManager(select=["decl"], entry_points=[], extra_plugins=[("decl", Decl())]).provided() == {
        "adapter": ("decl",)}


def test_essential_is_declared_by_the_plugin_not_listed_in_the_core():
    from ft_plugins import hf, lora

    import ft.kernel.plugins as manager

    assert not hasattr(manager, "ESSENTIAL")
    assert hf.PLUGIN.essential and not lora.PLUGIN.essential and lora.PLUGIN.feature


def test_a_plugin_turned_off_with_p_no_leaves_its_section_unread(ft_config, ft_dataset, ft_runner):
    """`plugins: [lora]` + a `lora:` section, run with `-p no:lora`: the run goes on without the plugin and
    its section is not read (and says so), instead of failing on an unknown key."""
    cfg = ft_config(dataset=ft_dataset(), plugins=["lora"], lora={"r": 4, "alpha": 8})
    on = ft_runner.validate(cfg).assert_ok()
    assert "lora" in on.output.split("selected features:")[1].splitlines()[0]
    off = ft_runner.validate(cfg, "-p", "no:lora").assert_ok()
    assert "lora" not in off.output.split("selected features:")[1].splitlines()[0]
    assert "section(s) lora not read: their plugin is turned off" in off.log
    ft_runner.validate(cfg, "--set", "lora.rr=4", "-p", "no:lora").assert_ok()  # unread, so not checked
    ft_runner.validate(cfg, "--set", "lora.rr=4").assert_error("lora.rr")
