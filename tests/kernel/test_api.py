"""The plugin-author API is one module: first-party plugins import ft only through `ft` and `ft.api`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
# Another plugin's documented API (the chat machinery for chat-based formats), and a plugin's own modules.
DOCUMENTED_PLUGIN_API = {"ft_plugins.chat_template": {"ChatTemplateOptions", "ChatTokenize", "build_chat_tokenize",
                                                      "resolve_chat_template"},
                         # preference pairs and their collator, for other pair methods (reward_model)
                         "ft_plugins.preference_data": {"PAIR_COLUMNS", "UnitCollator"},
                         # the GRPO machinery, for methods built on it (ebft)
                         "ft_plugins.grpo": {"GENERATION", "GRPOOptions", "PromptOptions", "PromptTokenize",
                                             "build_prompt_tokenize", "prompt_collator", "pack_rows", "RewardFunction",
                                             "trainer_class",
                                             # gathering sharded (FSDP2 / ZeRO-3) weights, for the vllm sync
                                             "full_parameters", "gathered_state"},
                         # how the reward_model reward renders what it scores, for `ft infer` on a reward model
                         "ft_plugins.rewards": {"render_scored"},
                         # the stepwise_supervised layout, for `ft infer` on a process reward model
                         "ft_plugins.prm": {"StepwiseOptions", "StepwiseTokenize"}}
OWN_MODULES = {"preference": ("ft_plugins.preference_data", "ft_plugins.preference_trainer",
                              "ft_plugins.preference_losses")}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return found


def test_first_party_plugins_import_ft_only_through_its_api():
    problems = []
    for path in sorted(PLUGINS.rglob("*.py")):
        rel = path.relative_to(PLUGINS)
        package = rel.parts[0] if len(rel.parts) > 1 else None  # a plugin that is a package (plugins/grpo/)
        stem = package or path.stem
        family = stem.split("_")[0]
        for module, names, line in _imports(path):
            where = f"plugins/{rel.as_posix()}:{line}"
            if module.startswith("ft.") and module != "ft.api":
                problems.append(f"{where}: imports {module}; import from ft.api (add the name there if it is missing)")
            elif module.startswith("ft_plugins.") and module != f"ft_plugins.{stem}" and not (
                    package and module.startswith(f"ft_plugins.{package}.")):
                allowed = DOCUMENTED_PLUGIN_API.get(module)
                own = module in OWN_MODULES.get(family, ())
                if not own and (allowed is None or not set(names) <= allowed):
                    problems.append(f"{where}: imports {module} ({', '.join(names)}), another plugin's internals")
            if module.startswith(("ft", "ft_plugins")):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    problems.append(f"{where}: imports private name(s) {', '.join(private)} from {module}")
    assert not problems, "\n".join(problems)


def test_every_api_name_resolves_and_importing_the_api_stays_light():
    import ft.api

    for name in ft.api.__all__:
        assert getattr(ft.api, name) is not None, name
    code = "import sys, ft.api; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unknown_api_name_is_an_attribute_error():
    import ft.api

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        ft.api.no_such_name  # noqa: B018
