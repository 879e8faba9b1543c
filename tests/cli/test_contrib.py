"""The contrib plugins, installed as separate distributions, work through ft like any plugin.

CI installs them (`pip install ./contrib/ft-sharegpt ./contrib/ft-kernel-example`); elsewhere
these tests skip and say how to install them. Their own tests live in contrib/*/tests.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
from pathlib import Path

import pytest

from ft.tools.tiny import make_chat_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]
CONTRIB = {"ft-sharegpt": "sharegpt", "ft-kernel-example": "kernel_example"}


def _source_version(dist: str) -> str:
    text = (REPO / "contrib" / dist / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def require(dist: str) -> str:
    """Skip unless ``dist`` is installed; fail if the installed copy is older than the checkout."""
    try:
        installed = md.version(dist)
    except md.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed; run `pip install ./contrib/{dist}` (CI installs it)")
    source = _source_version(dist)
    assert installed == source, f"{dist} {installed} is installed but contrib/{dist} is {source}: reinstall it"
    return installed


def test_ft_plugins_lists_contrib_plugins_with_versions(ft_runner):
    versions = {dist: require(dist) for dist in CONTRIB}
    infos = {i["name"]: i for i in ft_runner.plugins("--json").assert_ok().json()}
    sharegpt, kernel = infos["sharegpt"], infos["kernel_example"]
    assert (sharegpt["distribution"], sharegpt["version"]) == ("ft-sharegpt", versions["ft-sharegpt"])
    assert sharegpt["status"] == "active" and sharegpt["hooks"] == ["ft_register_formats"]
    assert (kernel["distribution"], kernel["version"]) == ("ft-kernel-example", versions["ft-kernel-example"])
    assert kernel["status"] == "available" and kernel["feature"] is True
    assert kernel["hooks"] == ["ft_add_config", "ft_patch_model"]
    table = ft_runner.plugins().assert_ok().stdout
    assert re.search(rf"^sharegpt +active +ft-sharegpt {re.escape(versions['ft-sharegpt'])} ", table, re.M)


def test_blocked_contrib_plugin_is_not_imported_and_its_type_is_unknown(ft_runner, ft_config, tmp_path):
    require("ft-sharegpt")
    data = write_jsonl(tmp_path / "talks.jsonl", [{"conversations": [{"from": "human", "value": "hi"}]}])
    config = ft_config(datasets=[{"path": str(data), "type": "sharegpt"}])
    ft_runner.validate(config, "-p", "no:sharegpt").assert_error(
        "unknown dataset type 'sharegpt'", "installed plugin that is not loaded: 'sharegpt' (ft-sharegpt", "blocked with -p no:sharegpt"
    )


def test_ft_run_with_sharegpt_gives_the_labels_of_the_same_talks_in_openai_format(ft_runner, ft_config, tmp_path):
    require("ft-sharegpt")
    require("ft-kernel-example")
    from ft.kernel.context import load_context
    from ft.run import preprocess

    talks = make_chat_rows(24, seed=7)
    to_sharegpt = {"system": "system", "user": "human", "assistant": "gpt"}
    openai = write_jsonl(tmp_path / "openai.jsonl", talks)
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": to_sharegpt[m["role"]], "value": m["content"]} for m in t["messages"]]}
        for t in talks
    ])
    config = ft_config(name="sharegpt.yaml", datasets=[{"path": str(sharegpt), "type": "sharegpt"}])
    # both contrib plugins in one run: the format (always active) and the kernel (selected)
    result = ft_runner.run(config, "-p", "kernel_example").assert_ok()
    manifest = json.loads((result.output_dir / "ft_plugins.json").read_text())
    assert sum(p.startswith("[kernel_example]") for p in manifest["patches"]) == 5

    got = preprocess(load_context(str(config)))[0]
    assert got.stats["cache"] == "hit"  # the very samples `ft run` trained on
    reference = ft_config(name="openai.yaml", datasets=[{"path": str(openai), "type": "chat_template"}])
    want = preprocess(load_context(str(reference)))[0]
    assert len(got.train) == len(want.train) == len(talks)
    assert got.train["input_ids"] == want.train["input_ids"]
    assert got.train["labels"] == want.train["labels"]
    trained = sum(label != -100 for row in got.train["labels"] for label in row)
    assert 0 < trained < sum(len(row) for row in got.train["labels"])
