"""ft.tools.testing, the pytest plugin for plugin authors, and `ft plugins --hook NAME`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import Plugin
from ft.kernel.formats import DatasetOptions
from ft.tools.testing import HookRecorder, registered_plugin


class ShoutOptions(DatasetOptions):
    field_name: str = Field("text", description="Column holding the text.")


class ShoutSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    volume: int = Field(3, description="How loud.")


class ShoutPlugin:
    """A feature plugin with a section, a format and a cross-section check."""

    PLUGIN = Plugin(feature=True)

    @hookimpl
    def ft_add_config(self, registry):
        registry.add("shout", ShoutSection)

    @hookimpl
    def ft_register_formats(self, register):
        register.add("shout_text", ShoutOptions, lambda cfg, entry, tokenizer: None)

    @hookimpl
    def ft_validate_config(self, cfg):
        section = cfg.shout or ShoutSection()
        return ["shout.volume: must be at most 10; lower it"] if section.volume > 10 else None


def shout_config(ft_config, ft_dataset, **extra):
    data = ft_dataset(kind="completion", n=4)
    return ft_config(datasets=[{"path": str(data), "type": "shout_text", "field_name": "text"}], **extra)


def test_importing_ft_testing_stays_light():
    code = "import sys, ft.tools.testing; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


FOREIGN_TEST = '''
from ft import hookimpl

from ft.api import Plugin
from ft.kernel.formats import DatasetOptions


class EchoOptions(DatasetOptions):
    pass


class Careful:
    PLUGIN = Plugin(feature=True)

    @hookimpl
    def ft_register_formats(self, register):
        register.add("echo", EchoOptions, lambda cfg, entry, tokenizer: None)

    @hookimpl
    def ft_validate_config(self, cfg):
        return ["learning_rate: too high for this plugin; lower it"] if cfg.learning_rate > 1 else None


def test_plugin_rejects_high_lr(ft_register_plugin, ft_runner, ft_config, ft_dataset):
    ft_register_plugin(Careful(), "careful")
    cfg = ft_config(datasets=[{"path": str(ft_dataset()), "type": "echo"}], learning_rate=5.0,
                    base_model="org/some-model")  # validating loads no model
    ft_runner.validate(cfg, "-p", "careful").assert_error("too high for this plugin")
    ft_runner.validate(cfg, "-p", "careful", "--set", "learning_rate=0.1").assert_ok()


def test_validating_needs_no_torch(ft_config, ft_dataset, ft_runner):
    import sys

    ft_runner.validate(ft_config(dataset=ft_dataset(), base_model="org/some-model")).assert_ok()
    assert "torch" not in sys.modules
'''


def test_fixtures_are_available_in_any_project_through_the_entry_point(tmp_path):
    """A foreign project with no conftest gets the fixtures because ft is installed."""
    (tmp_path / "test_foreign.py").write_text(FOREIGN_TEST)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed" in res.stdout


def test_registered_plugin_is_listed_then_gone(ft_runner):
    with registered_plugin(ShoutPlugin(), "shout") as name:
        assert name == "shout"
        infos = {i["name"]: i for i in ft_runner.plugins("--json").assert_ok().json()}
        assert infos["shout"]["status"] == "available" and infos["shout"]["feature"] is True
        assert infos["shout"]["hooks"] == ["ft_add_config", "ft_register_formats", "ft_validate_config"]
        with pytest.raises(ValueError, match="already registered"):
            with registered_plugin(ShoutPlugin(), "shout"):
                pass
    infos = {i["name"] for i in ft_runner.plugins("--json").assert_ok().json()}
    assert "shout" not in infos


def test_runner_validates_with_a_registered_feature(ft_register_plugin, ft_runner, ft_config, ft_dataset, tmp_path):
    ft_register_plugin(ShoutPlugin(), "shout")
    cfg = shout_config(ft_config, ft_dataset, shout={"volume": 5})
    # the section belongs to a feature that is not selected: a clean error saying how to select it
    ft_runner.validate(cfg).assert_error("plugin 'shout', which is not selected", "-p shout")
    res = ft_runner.validate(cfg, "-p", "shout").assert_ok()
    assert "selected features: shout" in res.stdout and "(shout_text)" in res.stdout
    assert res.output_dir == tmp_path / "out"
    # --set overrides reach both the command and the result's output_dir
    res = ft_runner.validate(cfg, "-p", "shout", "--set", "shout.volume=11", "--set", f"output_dir={tmp_path / 'o2'}")
    res.assert_error("shout.volume: must be at most 10")
    assert res.output_dir == tmp_path / "o2"


def test_runner_reports_config_errors_with_line_and_key(ft_runner, ft_register_plugin, ft_config, ft_dataset):
    ft_register_plugin(ShoutPlugin(), "shout")
    cfg = shout_config(ft_config, ft_dataset, lerning_rate=0.1)
    res = ft_runner.validate(cfg, "-p", "shout")
    res.assert_error("lerning_rate", "Did you mean 'learning_rate'?")
    assert res.exit_code == 2 and res.exception is None
    assert f"{cfg}:" in res.stderr
    with pytest.raises(AssertionError, match="lerning_rate"):
        res.assert_ok()


def test_hook_recorder_sees_registration_and_pipeline_hooks(ft_hook_recorder, ft_register_plugin, ft_runner,
                                                             ft_config, ft_dataset):
    ft_register_plugin(ShoutPlugin(), "shout")
    cfg = shout_config(ft_config, ft_dataset, shout={"volume": 4})
    ft_runner.validate(cfg, "-p", "shout").assert_ok()
    # registration hooks reach every loaded plugin (stamped through the registries) ...
    assert ft_hook_recorder.called("ft_add_config", "shout")
    assert ft_hook_recorder.called("ft_register_formats", "shout")
    assert "optimizers" in ft_hook_recorder.plugins_called("ft_register_optimizers")
    # ... and the validated config reaches the plugin's check, typed by its section model
    [call] = [c for c in ft_hook_recorder.calls_to("ft_validate_config") if c.plugin == "shout"]
    assert call.kwargs["cfg"].shout.volume == 4 and call.result is None
    assert ft_hook_recorder.hooks().index("ft_add_config") < ft_hook_recorder.hooks().index("ft_validate_config")
    with pytest.raises(ValueError, match="unknown hook 'ft_load_modle'"):
        ft_hook_recorder.calls_to("ft_load_modle")


def test_hook_recorder_records_exceptions_and_stops_when_closed(ft_register_plugin):
    from ft.kernel.errors import PluginHookError
    from ft.kernel.plugins import PluginManager

    class Broken:
        @hookimpl
        def ft_model_kwargs(self, cfg):
            raise ValueError("no kwargs today")

    with HookRecorder() as rec:
        pm = PluginManager(entry_points=[], extra_plugins=[("broken", Broken())])
        with pytest.raises(PluginHookError, match="plugin 'broken' failed in hook ft_model_kwargs"):
            pm.call("ft_model_kwargs", cfg=None)
    [call] = rec.calls_to("ft_model_kwargs")
    assert call.plugin == "broken" and "no kwargs today" in str(call.exception)
    PluginManager(entry_points=[], extra_plugins=[("broken", Broken())]).call("ft_validate_config", cfg=None)
    assert len(rec.calls) == 1  # managers made after the block are not recorded


def test_firstresult_recording_shows_who_answered():
    from ft.kernel.plugins import PluginManager

    class Early:
        @hookimpl(tryfirst=True)
        def ft_load_dataset(self, cfg, entry):
            return None

    class Answers:
        @hookimpl
        def ft_load_dataset(self, cfg, entry):
            return "MyRows"

    class Late:
        @hookimpl(trylast=True)
        def ft_load_dataset(self, cfg, entry):
            return "DefaultRows"

    with HookRecorder() as rec:
        pm = PluginManager(entry_points=[], extra_plugins=[("late", Late()), ("answers", Answers()), ("early", Early())])
        assert pm.call("ft_load_dataset", cfg=None, entry=None) == "MyRows"
    assert rec.plugins_called("ft_load_dataset") == ["early", "answers"]  # 'late' never ran
    assert rec.results("ft_load_dataset") == [None, "MyRows"]


class HelloCommand:
    @hookimpl
    def ft_add_commands(self, cli):
        import click

        @click.command("hello")
        @click.argument("name")
        def hello(name):
            """Say hello."""
            click.echo(f"hello {name}")

        cli.add_command(hello)


def test_runner_sees_commands_of_plugins_registered_for_the_test(ft_runner):
    ft_runner.plugins().assert_ok()  # the CLI has already added plugin commands once in this process
    with registered_plugin(HelloCommand(), "hello_cmd"):
        assert ft_runner.invoke("hello", "world").assert_ok().stdout == "hello world\n"
        assert "hello" in ft_runner.invoke("--help").assert_ok().stdout
    ft_runner.invoke("hello", "world").assert_error("No such command 'hello'")


# -- ft plugins --hook NAME ----------------------------------------------------------------------


class LoaderFirst:
    @hookimpl(tryfirst=True)
    def ft_load_model(self, cfg, kwargs):
        return None


class LoaderLast:
    @hookimpl(trylast=True)
    def ft_load_model(self, cfg):
        return None


class LoaderFeature:
    PLUGIN = Plugin(feature=True)

    @hookimpl
    def ft_load_model(self, cfg):
        return None


def test_plugins_hook_shows_effective_call_order(ft_register_plugin, ft_runner):
    for name, obj in (("zz_last", LoaderLast()), ("aa_first", LoaderFirst()), ("mid_feature", LoaderFeature())):
        ft_register_plugin(obj, name)
    res = ft_runner.plugins("--hook", "ft_load_model").assert_ok()
    lines = [line.strip() for line in res.stdout.splitlines()]
    assert lines[0] == "ft_load_model calls, in order:"
    listed = [line.split(". ", 1)[1] for line in lines[1:] if line[:1].isdigit()]
    names = [entry.split(" ", 1)[0] for entry in listed]
    # tryfirst/trylast decide the order, not the registration order
    assert names[0] == "aa_first" and names[-1] == "zz_last"
    assert "mid_feature (available)" in listed  # an unselected feature is shown with its status
    res = ft_runner.plugins("--hook", "ft_load_model", "-p", "mid_feature", "--json").assert_ok()
    assert res.json()["order"][0] == "aa_first" and res.json()["order"][-1] == "zz_last"
    assert "mid_feature" in res.json()["order"]


def test_plugins_hook_unknown_name_is_a_clean_error(ft_runner):
    res = ft_runner.plugins("--hook", "ft_load_modle")
    res.assert_error("unknown hook 'ft_load_modle'", "ft_load_model")


def test_dataset_writer_and_config_writer(ft_dataset, ft_config, ft_tiny_model_dir, tmp_path):
    chat = ft_dataset(n=3)
    rows = [json.loads(line) for line in chat.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["messages"][-1]["role"] == "assistant"
    alpaca = ft_dataset(kind="alpaca", n=2, name="alpaca.jsonl")
    assert set(json.loads(alpaca.read_text().splitlines()[0])) == {"instruction", "input", "output"}
    own = ft_dataset([{"text": "hi"}], name="own.jsonl")
    assert own.read_text() == '{"text": "hi"}\n'
    with pytest.raises(ValueError, match="unknown row kind"):
        ft_dataset(kind="sharegpt")
    import yaml

    cfg = yaml.safe_load(ft_config(dataset=chat, max_steps=3).read_text())
    assert cfg["base_model"] == str(ft_tiny_model_dir) and cfg["max_steps"] == 3
    assert cfg["datasets"] == [{"path": str(chat), "type": "chat_template"}]
    assert cfg["output_dir"] == str(tmp_path / "out")
    assert (ft_tiny_model_dir / "config.json").exists() and (ft_tiny_model_dir / "tokenizer.json").exists()


ONE_THREAD_TEST = '''
import pytest
import torch

torch.set_num_threads(3)


@pytest.mark.usefixtures("ft_one_torch_thread")
def test_one_thread_inside():
    assert torch.get_num_threads() == 1


def test_restored_after():
    assert torch.get_num_threads() == 3
'''


def test_one_torch_thread_fixture_sets_one_thread_and_restores_the_count(tmp_path):
    (tmp_path / "test_threads.py").write_text(ONE_THREAD_TEST)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed" in res.stdout
