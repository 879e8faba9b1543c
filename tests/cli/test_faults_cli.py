"""Issue 22, hostile configs and the command line: every bad input is one clear ft error, not a hang or a traceback."""

from __future__ import annotations

import pytest

from ft.kernel.errors import ConfigError, FtError
from ft.tools.testing import FtRunner

HEAD = "base_model: {model}\ndatasets:\n  - path: {data}\n    type: chat_template\n"


@pytest.fixture
def head(tmp_path, ft_tiny_model_dir, chat_jsonl):
    return HEAD.format(model=ft_tiny_model_dir, data=chat_jsonl)


def alias_bomb(levels: int) -> str:
    """Nine aliases of the level below on each level: 9**levels values once expanded."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_by_every_command_that_reads_a_config(head, tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(head + alias_bomb(6))  # 9**6 = 531,441 values (the bomb had no end)
    for command in ("validate", "run", "preprocess", "convert"):
        FtRunner().invoke(command, config).assert_error(
            f"{config}:9: the alias *a3 makes the config expand to", "at most 10,000 may come from aliases")


def test_an_anchor_reused_a_few_times_is_fine(tmp_path, ft_tiny_model_dir, chat_jsonl):
    config = tmp_path / "anchors.yaml"
    config.write_text(f"base_model: {ft_tiny_model_dir}\ndatasets:\n  - &chat {{path: {chat_jsonl}, type: chat_template}}\n"
                      "  - *chat\ntest_datasets: [*chat]\n")
    FtRunner().validate(config).assert_ok()


def test_a_config_deeper_than_any_real_one_is_an_error_not_a_recursion_error(head, tmp_path):
    config = tmp_path / "deep.yaml"
    config.write_text(head + "lr_scheduler_kwargs: {x: " + "[" * 600 + "]" * 600 + "}\n")
    FtRunner().validate(config).assert_error(f"{config}:5: the config nests deeper than 64 levels")
    with pytest.raises(ConfigError, match="--set seed:1: the --set value nests deeper than 64 levels"):
        from ft.kernel.config_file import apply_overrides

        apply_overrides({}, ["seed=" + "[" * 600 + "]" * 600])


def test_a_config_over_the_size_limit_is_refused_before_it_is_parsed(head, tmp_path):
    config = tmp_path / "huge.yaml"
    config.write_text(head + ("# " + "x" * 98 + "\n") * 11_000)  # 1.1 MB, a valid config otherwise
    FtRunner().validate(config).assert_error(f"{config}: the config is 1,1", "bytes; ft reads configs of at most 1,048,576 bytes")
    FtRunner().validate("/dev/zero").assert_error("/dev/zero: the config is more than 1,048,576 bytes")  # no end


def test_a_config_that_is_not_utf8_names_the_line(head, tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes((head + "output_dir: café\n").encode("latin-1"))
    FtRunner().validate(config).assert_error(f"{config}:5: the config is not UTF-8 text (byte 0xe9 at column 16)",
                                             "Save it as UTF-8")


# -- plugins: failures are errors that name the plugin and its file:line ----------------------------


def plugin_file(tmp_path, name: str, code: str):
    import textwrap

    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


def test_sys_exit_in_a_plugin_file_at_import_is_an_error_naming_it(head, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(head)
    plugin = plugin_file(tmp_path, "quits", "import sys\nsys.exit(3)\n")
    result = FtRunner().validate(config, "-p", str(plugin))
    result.assert_error(f"-p {plugin}: importing the plugin file failed: it called sys.exit(3) while being imported "
                        f"(at {plugin}:2)")
    assert result.exit_code == 2


def test_an_installed_plugin_that_exits_at_import_is_listed_failed_and_ft_goes_on(head, tmp_path):
    import json
    import subprocess
    import sys

    from ft.tools.testing import install_distribution

    env = install_distribution(tmp_path / "site", "ft-exit-plugin", "0.1", {"ftq_exit": "import sys\nsys.exit(3)\n"},
                               {"quits": "ftq_exit"})
    listed = subprocess.run([sys.executable, "-m", "ft.cli", "plugins", "--json"], env=env, capture_output=True,
                            text=True)
    assert listed.returncode == 0, listed.stderr  # was: exit 3 and nothing printed
    info = {i["name"]: i for i in json.loads(listed.stdout)}["quits"]
    assert info["status"] == "failed"
    assert info["error"] == (f"import failed: it called sys.exit(3) while being imported (at "
                             f"{tmp_path / 'site' / 'ftq_exit.py'}:2)")
    config = tmp_path / "c.yaml"
    config.write_text(head)
    checked = subprocess.run([sys.executable, "-m", "ft.cli", "validate", str(config)], env=env, capture_output=True,
                             text=True)
    assert checked.returncode == 0 and "warning: plugin 'quits' (ft-exit-plugin 0.1) is installed but could not " \
                                       "be loaded: import failed: it called sys.exit(3)" in checked.stderr


def test_a_selected_plugin_file_whose_registration_fails_is_an_error_not_valid(head, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(head)
    plugin = plugin_file(tmp_path, "noreg", '''
        from ft import hookimpl
        from ft.api import Plugin
        PLUGIN = Plugin(feature=True)
        @hookimpl
        def ft_add_config(registry):
            raise RuntimeError("no section today")
    ''')
    result = FtRunner().validate(config, "-p", str(plugin)).assert_error(
        f"plugin 'noreg' ({plugin}) is selected but failed to load: ft_add_config raised",
        "RuntimeError: no section today", f"at {plugin}:7 in ft_add_config")
    assert "valid" not in result.stdout


def test_contract_and_hook_name_errors_carry_the_plugins_file_and_line(head, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(head)
    returns = plugin_file(tmp_path, "returns5", '''
        from ft import hookimpl

        @hookimpl
        def ft_register_formats(register):
            return 5
    ''')
    FtRunner().validate(config, "-p", str(returns)).assert_error(
        f"plugin 'returns5' returned int 5 from ft_register_formats ({returns}:4); the hook expects None")
    misnamed = plugin_file(tmp_path, "misnamed", '''
        from ft import hookimpl

        @hookimpl
        def ft_validate_confg(cfg):
            return None
    ''')
    FtRunner().validate(config, "-p", str(misnamed)).assert_error(
        f"plugin 'misnamed' ({misnamed}) is invalid: 'ft_validate_confg' ({misnamed}:4) is marked @hookimpl but there "
        "is no such hook. Did you mean 'ft_validate_config'?")
    bad_args = plugin_file(tmp_path, "badargs", '''
        from ft import hookimpl

        @hookimpl
        def ft_validate_config(cfg, kwargz):
            return None
    ''')
    FtRunner().validate(config, "-p", str(bad_args)).assert_error(
        f"plugin 'badargs' ({bad_args}) is invalid: invalid hook implementation ({bad_args}:4)", "kwargz")


def test_ft_plugins_says_what_each_plugin_registers_and_why_one_failed(tmp_path):
    plugin = plugin_file(tmp_path, "regfails", '''
        from ft import hookimpl

        @hookimpl
        def ft_register_rewards(register):
            raise ValueError("no rewards today")
    ''')
    result = FtRunner().plugins("-p", str(plugin)).assert_ok()
    lines = result.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("regfails "))
    assert " failed " in lines[row] and str(plugin) in lines[row]
    assert lines[row + 1].strip().startswith("-> failed: ft_register_rewards raised: plugin 'regfails' failed in hook "
                                             "ft_register_rewards: ValueError: no rewards today")
    text = result.stdout
    assert "registers sections lora; commands merge" in text
    assert "registers formats alpaca" in text and "registers rewards exact_match," in text
    assert "optimizers adamw_torch," in text and "; schedulers cosine," in text
    listed = {i["name"]: i for i in FtRunner().plugins("--json").assert_ok().json()}
    assert listed["grpo"]["registers"] == {"sections": ["grpo"], "formats": ["prompt"], "methods": ["grpo"]}
    assert listed["axolotl"]["registers"] == {"commands": ["convert"]}


def test_cfg_section_with_a_typo_raises_with_a_did_you_mean(head, tmp_path):
    from ft.kernel.context import load_context

    config = tmp_path / "c.yaml"
    config.write_text(head)
    cfg = load_context(config).cfg
    assert cfg.section("lora").r == 16  # an installed plugin's section: its defaults
    assert cfg.section("sft") is None  # a method without a section
    with pytest.raises(FtError, match=r"test_faults_cli.py:\d+: cfg.section\('lroa'\): no plugin or method named "
                                      r"'lroa' is installed. Did you mean 'lora'\?"):
        cfg.section("lroa")


def test_an_exception_in_code_a_plugin_patched_into_torch_names_the_plugin(head, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(head + "max_steps: 1\nsequence_len: 256\n")
    plugin = plugin_file(tmp_path, "patcher", '''
        import torch

        def forward(self, x):
            raise RuntimeError("patched away")

        torch.nn.Linear.forward = forward
    ''')
    import torch

    original = torch.nn.Linear.forward
    try:
        result = FtRunner().run(config, "-p", str(plugin), "--set", f"output_dir={tmp_path / 'out'}")
    finally:
        torch.nn.Linear.forward = original
    result.assert_error("plugin 'patcher' failed in code it runs outside its hooks",
                        "RuntimeError: patched away", f"at {plugin}:5 in forward")


# -- absurd batch sizes ----------------------------------------------------------------------------


def test_an_absurd_effective_batch_is_refused_at_validation(head, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(head + "gradient_accumulation_steps: 1000000000\n")
    FtRunner().validate(config).assert_error(
        f"{config}:5: gradient_accumulation_steps: the effective batch is 1,000,000,000 samples per optimizer step "
        "(micro_batch_size 1 x gradient_accumulation_steps 1,000,000,000 x 1 process(es)); at most 1,048,576")
    config.write_text(head + "gradient_accumulation_steps: 100000\nmicro_batch_size: 2\n")
    FtRunner().validate(config).assert_ok()
    FtRunner().validate(config, "--nproc", "8").assert_error("the effective batch is 1,600,000 samples",
                                                               "x 8 process(es)")


def test_data_smaller_than_the_batch_warns_with_the_real_figures_and_reports_the_real_batch(head, tmp_path):
    import json

    config = tmp_path / "c.yaml"
    config.write_text(head + f"micro_batch_size: 2\ngradient_accumulation_steps: 100\nmax_steps: 1\nsequence_len: 256\n"
                             f"output_dir: {tmp_path / 'out'}\ndataset_prepared_path: {tmp_path / 'prepared'}\n")
    result = FtRunner().run(config).assert_ok()
    assert (f"{config}:6: gradient_accumulation_steps: the training data has 32 rows, fewer than one effective batch "
            "(2 x 100 x 1 = 200): every optimizer step is the whole epoch, so the effective batch is 32, not 200. "
            "Lower gradient_accumulation_steps to 16 or less") in result.log
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())["summary"]
    assert summary["effective_batch_size"] == 32  # was 200: the configured product, not what a step took


def test_a_micro_batch_larger_than_the_data_names_both_figures(head, tmp_path):
    from ft.kernel.config_checks import batch_warnings, real_effective_batch
    from ft.kernel.context import load_context

    config = tmp_path / "c.yaml"
    config.write_text(head + "micro_batch_size: 64\n")
    cfg = load_context(config).cfg
    (warning,) = batch_warnings(cfg, 32, world=2)
    assert warning.startswith(f"{config}:5: micro_batch_size: the training data has 32 rows, fewer than one batch of "
                              "micro_batch_size 64 x 2 process(es) = 128: every optimizer step is the whole epoch, so "
                              "the effective batch is 32, not 128. Lower micro_batch_size to 16 or less")
    assert real_effective_batch(cfg, 32, world=2) == 32 and real_effective_batch(cfg, 1000, world=2) == 128
    assert batch_warnings(cfg, 1000, world=1) == []


def test_vllm_serve_reads_its_config_with_the_same_limits(head, tmp_path):
    from ft_plugins.vllm import _source

    config = tmp_path / "bomb.yaml"
    config.write_text(head + alias_bomb(6))
    with pytest.raises(ConfigError, match="the alias \\*a3 makes the config expand to"):
        _source(str(config))
    config.write_text(head)
    assert _source(str(config))[0] == head.split("\n")[0].split(": ")[1]
