"""`ft --help` and `ft validate` import only what they need (issue 24, item 8).

`ft --help` lists plugin commands from ``ft.commands_cache`` once a run has written it: then it
imports no plugin, no pydantic, no torch. The cache must never list a stale command: a plugin
installed, edited or removed shows in the very next `ft --help`. No timings are asserted here
(bench/startup.py measures them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ft import hookimpl
from ft.tools.testing import install_distribution, registered_plugin

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate")

# Runs the CLI as the `ft` script does, then prints (on stderr, last line) the modules it imported.
RUN = """
import json, sys
sys.argv = ["ft", *sys.argv[1:]]
from ft.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def ft(env, *args):
    res = subprocess.run([sys.executable, "-c", RUN, *args], env=env, cwd=REPO, capture_output=True, text=True)
    *err, last = res.stderr.splitlines() or [""]
    info = json.loads(last)
    return res.stdout, "\n".join(err), info["code"], set(info["modules"])


def plugin_modules(modules):
    return sorted(m for m in modules if m.startswith("ft_plugins.") or m in ("ft.kernel.context", "ft.kernel.config", "pydantic"))


HELLO = '''
    """A plugin that adds a command."""
    import click
    from ft import hookimpl

    @hookimpl
    def ft_add_commands(cli):
        @cli.command("{name}")
        def hello():
            """{help}"""
            click.echo("hello from {name}")
'''


@pytest.fixture
def env(tmp_path):
    """A site directory on PYTHONPATH (with one plugin distribution) and an empty cache directory."""
    site = tmp_path / "site"
    env = install_distribution(site, "ft-startup-one", "1.0", {"ftt_startup_one": HELLO.format(
        name="hello-one", help="Say hello once.")}, {"startup_one": "ftt_startup_one"})
    env["FT_CACHE_DIR"] = str(tmp_path / "cache")
    return env, site


def test_help_after_the_first_imports_no_plugin_and_prints_the_same(env):
    env, _site = env
    cold_out, _err, code, cold = ft(env, "--help")
    assert code == 0 and "hello-one" in cold_out and "infer" in cold_out
    assert "ft_plugins.infer" in cold  # the first run loads the plugins and writes the cache
    warm_out, _err, code, warm = ft(env, "--help")
    assert code == 0
    assert warm_out == cold_out  # the same list, the same help texts
    failed = [i["name"] for i in json.loads(ft(env, "plugins", "--json")[0]) if i["status"] == "failed"]
    assert failed == [], f"a plugin that fails to load turns the cache off: {failed} (see `ft plugins`)"
    assert plugin_modules(warm) == [] and "ftt_startup_one" not in warm
    assert [m for m in HEAVY if m in warm] == []
    bare = subprocess.run([sys.executable, "-c", "import sys; print(' '.join(sys.modules))"], env=env,
                          capture_output=True, text=True).stdout.split()
    if "importlib.metadata" not in bare:  # (a .pth file of some environments imports it at start-up)
        assert "importlib.metadata" not in warm  # checking the cache scans no distribution metadata


def test_validate_imports_no_torch(env):
    env, _site = env
    out, err, code, modules = ft(env, "validate", "examples/tiny.yaml")
    assert code == 0, err
    assert "valid" in out
    assert [m for m in HEAVY if m in modules] == []
    assert "numpy" not in modules  # a plugin reading ft.api.is_token_column once pulled numpy into every validate


def test_plugin_commands_still_run_from_a_cached_help(env):
    env, _site = env
    ft(env, "--help")
    out, err, code, _modules = ft(env, "hello-one")
    assert code == 0, err
    assert out == "hello from hello-one\n"


def test_a_plugin_installed_edited_or_removed_shows_in_the_next_help(env):
    env, site = env
    assert "hello-one" in ft(env, "--help")[0]
    assert "hello-one" in ft(env, "--help")[0]  # from the cache

    # installed into a directory already on the path
    install_distribution(site, "ft-startup-two", "1.0", {"ftt_startup_two": HELLO.format(
        name="hello-two", help="Say hello twice.")}, {"startup_two": "ftt_startup_two"})
    out = ft(env, "--help")[0]
    assert "hello-two" in out and "Say hello twice." in out
    out, _err, _code, modules = ft(env, "--help")
    assert "hello-two" in out and "ftt_startup_two" not in modules

    # its module edited: another name, another help text
    (site / "ftt_startup_two.py").write_text(textwrap.dedent(HELLO.format(name="hello-edited", help="Edited.")))
    out = ft(env, "--help")[0]
    assert "hello-edited" in out and "Edited." in out and "hello-two" not in out
    assert ft(env, "hello-edited")[0] == "hello from hello-edited\n"

    # its entry point removed in place (the dist-info stays)
    info = site / "ft_startup_two-1.0.dist-info" / "entry_points.txt"
    info.write_text("[ft]\n")
    out = ft(env, "--help")[0]
    assert "hello-edited" not in out and "hello-one" in out

    # the whole distribution removed
    shutil.rmtree(site / "ft_startup_one-1.0.dist-info")
    out = ft(env, "--help")[0]
    assert "hello-one" not in out and "infer" in out


def test_autoload_switch_is_part_of_the_cache(env):
    env, _site = env
    assert "hello-one" in ft(env, "--help")[0]
    off = {**env, "FT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    assert "hello-one" not in ft(off, "--help")[0]
    assert "hello-one" in ft(env, "--help")[0]


BROKEN = {
    "ftt_startup_raises": '''
        from ft import hookimpl

        @hookimpl
        def ft_add_commands(cli):
            raise RuntimeError("no commands today")
    ''',
    "ftt_startup_import_error": '''
        raise RuntimeError("boom at import")
    ''',
}


@pytest.mark.parametrize("module", sorted(BROKEN))
def test_a_broken_plugin_is_reported_on_every_help_and_never_cached(tmp_path, module):
    env = install_distribution(tmp_path / "site", "ft-startup-broken", "1.0", {module: BROKEN[module]},
                               {"broken": module})
    env["FT_CACHE_DIR"] = str(tmp_path / "cache")
    runs = [ft(env, "--help") for _ in range(2)]
    for out, err, code, modules in runs:
        assert code == 0 and "validate" in out
        assert "ft_plugins.infer" in modules  # the plugins load every time: nothing cached
        if module == "ftt_startup_raises":
            assert "warning: plugin commands unavailable" in err and "no commands today" in err
    assert not list((tmp_path / "cache").glob("commands-*.json"))


class HelloCommand:
    @hookimpl
    def ft_add_commands(self, cli):
        import click

        @click.command("hello-process")
        def hello():
            """Say hello from a plugin of this process."""
            click.echo("hello")

        cli.add_command(hello)


def test_plugins_registered_for_the_process_bypass_the_cache(ft_runner, tmp_path, monkeypatch):
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path))
    assert "hello-process" not in ft_runner.invoke("--help").assert_ok().stdout  # writes the cache
    assert list(tmp_path.glob("commands-*.json"))
    with registered_plugin(HelloCommand(), "hello_process"):
        assert "hello-process" in ft_runner.invoke("--help").assert_ok().stdout


def test_bench_reports_figures_and_says_why_a_cli_is_missing(tmp_path):
    """bench/startup.py keeps working: one round, JSON figures, no number for a CLI that is not there."""
    res = subprocess.run([sys.executable, str(REPO / "bench" / "startup.py"), "--repeat", "1", "--nice", "0",
                          "--axolotl-python", str(tmp_path / "no-python"), "--only", "python_floor", "ft_help",
                          "ft_help_cold"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert sorted(report["results"]) == ["ft_help", "ft_help_cold", "python_floor"]
    for figures in report["results"].values():
        for kind in ("wall_s", "cpu_s"):
            assert 0 < figures[kind]["min"] <= figures[kind]["median"]
    assert report["results"]["ft_help"]["command"] == "python ft --help"
    assert "no interpreter at" in report["unavailable"]["axolotl_help"]
    assert report["goal"]["goal_s"] == 0.15 and isinstance(report["goal"]["met"], bool)


def test_a_plugin_that_changes_sys_path_at_import_still_gets_a_cache(tmp_path):
    """The cache is filed under the sys.path a run starts with, not the one the plugins leave."""
    module = HELLO.format(name="hello-path", help="Changes the path.") + "\n    import sys\n    sys.path.append('/nonexistent-ft-test')\n"
    env = install_distribution(tmp_path / "site", "ft-startup-path", "1.0", {"ftt_startup_path": module},
                               {"startup_path": "ftt_startup_path"})
    env["FT_CACHE_DIR"] = str(tmp_path / "cache")
    assert "hello-path" in ft(env, "--help")[0]
    out, _err, _code, modules = ft(env, "--help")
    assert "hello-path" in out and "ftt_startup_path" not in modules
