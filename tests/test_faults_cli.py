"""Issue 22, hostile configs and the command line: every bad input is one clear ft error, not a hang or a traceback."""

from __future__ import annotations

import pytest

from ft.errors import ConfigError
from ft.testing import FtRunner

HEAD = "base_model: {model}\ndatasets:\n  - path: {data}\n    type: chat_template\n"


@pytest.fixture
def head(tmp_path, tiny_model_dir, chat_jsonl):
    return HEAD.format(model=tiny_model_dir, data=chat_jsonl)


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


def test_an_anchor_reused_a_few_times_is_fine(tmp_path, tiny_model_dir, chat_jsonl):
    config = tmp_path / "anchors.yaml"
    config.write_text(f"base_model: {tiny_model_dir}\ndatasets:\n  - &chat {{path: {chat_jsonl}, type: chat_template}}\n"
                      "  - *chat\ntest_datasets: [*chat]\n")
    FtRunner().validate(config).assert_ok()


def test_a_config_deeper_than_any_real_one_is_an_error_not_a_recursion_error(head, tmp_path):
    config = tmp_path / "deep.yaml"
    config.write_text(head + "lr_scheduler_kwargs: {x: " + "[" * 600 + "]" * 600 + "}\n")
    FtRunner().validate(config).assert_error(f"{config}:5: the config nests deeper than 64 levels")
    with pytest.raises(ConfigError, match="--set seed:1: the --set value nests deeper than 64 levels"):
        from ft.config import apply_overrides

        apply_overrides({}, ["seed=" + "[" * 600 + "]" * 600])


def test_a_config_over_the_size_limit_is_refused_before_it_is_parsed(head, tmp_path):
    config = tmp_path / "huge.yaml"
    config.write_text(head + ("# " + "x" * 98 + "\n") * 11_000)  # 1.1 MB, a valid config otherwise
    FtRunner().validate(config).assert_error(f"{config}: the config is 1,1", "bytes; ft reads configs of at most 1,048,576 bytes")


def test_a_config_that_is_not_utf8_names_the_line(head, tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes((head + "output_dir: café\n").encode("latin-1"))
    FtRunner().validate(config).assert_error(f"{config}:5: the config is not UTF-8 text (byte 0xe9 at column 16)",
                                             "Save it as UTF-8")
