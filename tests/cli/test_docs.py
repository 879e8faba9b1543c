"""The generated reference pages are current and complete; the guides name only real hooks."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ft import hookspecs
from ft.kernel.hooks import hook_names
from ft.tools.testing import install_distribution

DOCS = Path(__file__).resolve().parents[2] / "docs"
REGENERATE = "run `python docs/generate.py` and commit the result"


@pytest.fixture(scope="module")
def generate():
    spec = importlib.util.spec_from_file_location("ft_docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hooks_md() -> str:
    return (DOCS / "hooks.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def config_md() -> str:
    return (DOCS / "config.md").read_text(encoding="utf-8")


def test_hooks_md_is_current(generate, hooks_md):
    assert hooks_md == generate.render_hooks(), f"docs/hooks.md is stale: {REGENERATE}"


def test_config_md_is_current(generate, config_md):
    assert config_md == generate.render_config(), f"docs/config.md is stale: {REGENERATE}"


def _top_level_split(params: str) -> list[str]:
    """Split ``a: dict[str, Any], b: int`` at the commas outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in params:
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def _hook_section(hooks_md: str, name: str) -> str:
    match = re.search(rf"^### {name}\n(.*?)(?=^##|\Z)", hooks_md, re.S | re.M)
    assert match, f"docs/hooks.md has no section for hook {name}: {REGENERATE}"
    return match.group(1)


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_is_documented_with_its_exact_signature_and_mode(hooks_md, name):
    fn = getattr(hookspecs, name)
    section = _hook_section(hooks_md, name)
    signature = re.search(rf"def {name}\((.*?)\)( -> .*?)?: \.\.\.", section)
    assert signature, f"docs/hooks.md: no signature for {name}"
    documented = [p.split(":")[0].strip() for p in _top_level_split(signature.group(1)) if p.strip()]
    assert documented == list(inspect.signature(fn).parameters), f"docs/hooks.md: parameters of {name} differ"
    for param in documented:
        assert f"- `{param}`:" in section, f"docs/hooks.md: parameter {param} of {name} is not described"
    assert f"**Mode:** {fn.ft_hook.mode}" in section
    assert f"**Checked:** a plugin may return {fn.ft_hook.returns.what}" in section
    assert "**Returns:**" in section and "**Called:**" in section


def test_hooks_md_has_no_unknown_hooks(hooks_md):
    documented = set(re.findall(r"^### (ft_\w+)$", hooks_md, re.M))
    assert documented == set(hook_names()), f"documented hooks differ from hookspecs.py: {REGENERATE}"


def test_config_md_lists_every_core_key_and_section_field(config_md):
    from ft.kernel.schema import generate_schema

    schema = json.loads(generate_schema(autoload=False))
    defs = schema.get("$defs", {})
    for key, prop in schema["properties"].items():
        refs = [p["$ref"] for p in prop.get("anyOf", [prop]) if "$ref" in p]
        if not refs:  # a core key
            assert re.search(rf"^\| `{key}` \|", config_md, re.M), f"docs/config.md misses core key {key}"
            continue
        assert f"### `{key}`" in config_md, f"docs/config.md misses section {key}"
        for field in defs[refs[0].rsplit("/", 1)[-1]].get("properties", {}):
            assert f"| `{key}.{field}` |" in config_md, f"docs/config.md misses {key}.{field}"


def test_config_md_documents_every_dataset_format(config_md):
    from ft.kernel.context import collect_registries, make_plugin_manager

    regs = collect_registries(make_plugin_manager(autoload=False))
    for entry in regs.formats:
        section = config_md.split(f"### `type: {entry.name}`", 1)
        assert len(section) == 2, f"docs/config.md misses dataset type {entry.name}"
        own = set(entry.value.options.model_fields) - {"type"} - set(_common_keys())
        for key in own:
            assert f"| `{key}` |" in section[1].split("\n### ", 1)[0], f"{entry.name}: key {key} undocumented"


def _common_keys() -> list[str]:
    from ft.kernel.formats import DatasetOptions

    return list(DatasetOptions.model_fields)


def test_generated_pages_detect_drift(generate, monkeypatch, tmp_path):
    """--check fails on a stale page and passes on a fresh one."""
    monkeypatch.setattr(generate, "DOCS", tmp_path)
    assert generate.main([]) == 0
    assert generate.main(["--check"]) == 0
    (tmp_path / "hooks.md").write_text((tmp_path / "hooks.md").read_text().replace("### ft_pack\n", ""))
    assert generate.main(["--check"]) == 1


def test_a_new_hook_parameter_changes_the_page(generate, monkeypatch):
    def ft_load_model(cfg, kwargs, tokenizer, device_map):  # a parameter added to the spec
        """Load the base model."""

    ft_load_model.ft_spec = hookspecs.ft_load_model.ft_spec
    ft_load_model.ft_hook = hookspecs.ft_load_model.ft_hook
    monkeypatch.setattr(hookspecs, "ft_load_model", ft_load_model)
    assert "device_map" in generate.render_hooks().split("### ft_load_model", 1)[1].split("###", 1)[0]


FIXTURES = ("ft_tiny_model_dir", "ft_tiny_tokenizer", "ft_dataset", "ft_config", "ft_runner", "ft_hook_recorder",
            "ft_register_plugin", "ft_one_torch_thread")
MODULES = ("ft_plugins", "ft_sharegpt", "ft_kernel_example", "ft_qa", "ft_dolly", "ft_weighted_sft",
           "ft_record", "ft_check_stop")  # module names in the guides, and the Trainer's metrics and stop methods


@pytest.mark.parametrize("guide", ["writing-a-format-plugin.md", "writing-a-kernel-plugin.md", "writing-a-method-plugin.md",
                                   "rl.md"])
def test_guides_name_only_real_hooks_and_fixtures(guide):
    import ft.tools.testing

    text = (DOCS / guide).read_text(encoding="utf-8")
    names = set(re.findall(r"\b(ft_[a-z_]+)\b", text))
    assert names & set(hook_names()), f"{guide} names no hook"
    unknown = names - set(hook_names()) - set(FIXTURES) - set(MODULES)
    assert not unknown, f"{guide} names hooks or fixtures that do not exist: {sorted(unknown)}"
    for fixture in names & set(FIXTURES):
        assert hasattr(ft.tools.testing, fixture), f"{guide} names fixture {fixture}, which ft.tools.testing lacks"


def _code_block(text: str, first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if b.startswith(first_line + "\n")]
    assert len(found) == 1, f"expected one python block starting with {first_line!r}"
    return found[0]


def test_format_guide_example_works_as_an_installed_plugin(tmp_path):
    """The guide's plugin, installed through a real entry point, passes the guide's own tests."""
    text = (DOCS / "writing-a-format-plugin.md").read_text(encoding="utf-8")
    env = install_distribution(tmp_path / "site", "ft-qa", "0.1.0", {"ft_qa": _code_block(text, "# ft_qa.py")},
                               {"qa": "ft_qa"})
    project = tmp_path / "ft-qa"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_qa.py").write_text(_code_block(text, "# tests/test_qa.py"))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=project,
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "2 passed" in res.stdout


def test_the_short_format_example_fits_in_ten_lines_and_labels_right(tmp_path, ft_tiny_model_dir):
    """The guide's Dolly format: at most 10 lines of code, and it masks, trains and drops as promised."""
    import types

    from ft.kernel.context import load_context
    from ft.run import preprocess
    from ft.tools.testing import registered_plugin

    text = (DOCS / "writing-a-format-plugin.md").read_text(encoding="utf-8")
    code = _code_block(text, "# ft_dolly.py")
    lines = [line for line in code.splitlines() if line.strip() and not line.startswith(("#", "from ", "import "))]
    assert len(lines) <= 10, lines
    module = types.ModuleType("ft_dolly")
    exec(compile(code, "ft_dolly.py", "exec"), module.__dict__)
    rows = [{"instruction": "Name a colour.", "context": "Think of the sky.", "response": "Blue."},
            {"instruction": "Say hi.", "response": "Hi!"}, {"instruction": "No answer here."}]
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"base_model": str(ft_tiny_model_dir), "datasets": [{"path": str(data), "type": "dolly"}],
              "dataset_prepared_path": str(tmp_path / "prepared"), "shuffle": False}
    with registered_plugin(module, "dolly"):
        prepared, tokenizer = preprocess(load_context(config))
    assert prepared.report["dropped"]["missing field 'response'"]["examples"][0]["where"].endswith("dolly.jsonl:3")
    ids, labels = prepared.train[0]["input_ids"], prepared.train[0]["labels"]
    trained = tokenizer.decode([t for t in labels if t != -100])
    assert trained == "Blue." + tokenizer.eos_token
    assert "### Context:\nThink of the sky." in tokenizer.decode(ids)
