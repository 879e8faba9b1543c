"""Training methods are plugins: a toy third-party method, installed from its own distribution,
trains end to end through exactly the path SFT takes, and a format that lacks the method's
columns is refused at validation with file:line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ft.tools.testing import install_distribution

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[2] / "docs"


def weighted_sft_code() -> str:
    """The toy method of docs/writing-a-method-plugin.md: SFT where each row's loss is scaled by its weight."""
    import re

    text = (DOCS / "writing-a-method-plugin.md").read_text(encoding="utf-8")
    [code] = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith("# ft_weighted_sft.py\n")]
    return code


@pytest.fixture
def weighted_env(tmp_path):
    """The toy method as its own distribution (dist-info + entry point) on PYTHONPATH."""
    env = install_distribution(tmp_path / "site", "ft-weighted-sft", "0.1.0", {"ft_weighted_sft": weighted_sft_code()},
                               {"weighted_sft": "ft_weighted_sft"})
    env["FT_NO_PROGRESS"] = "1"
    return env


def ft(env, *args, cwd):
    return subprocess.run([sys.executable, "-m", "ft.cli", *args], env=env, cwd=cwd, capture_output=True, text=True)


def write_config(tmp_path: Path, model: Path, weight: float, *, dataset_type: str = "weighted") -> Path:
    rows = [{"prompt": f"What is {i} plus {i}? ", "completion": f"It is {2 * i}.", "text": "x", "weight": weight}
            for i in range(16)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        base_model: {model}
        method: weighted_sft
        datasets:
          - path: {data}
            type: {dataset_type}
        sequence_len: 64
        micro_batch_size: 4
        max_steps: 3
        logging_steps: 1
        learning_rate: 1.0e-2
        weight_decay: 0.0
        output_dir: {tmp_path / "out"}
        dataset_prepared_path: {tmp_path / "prepared"}
        dataset_num_proc: 1
        """))
    return config


def test_a_third_party_method_trains_end_to_end(weighted_env, ft_tiny_model_dir, tmp_path):
    config = write_config(tmp_path, ft_tiny_model_dir, weight=0.5)
    listed = ft(weighted_env, "plugins", cwd=tmp_path)
    assert "weighted_sft" in listed.stdout and "ft-weighted-sft 0.1.0" in listed.stdout
    result = ft(weighted_env, "run", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["summary"]["method"] == "weighted_sft" and metrics["summary"]["steps"] == 3
    history = metrics["history"]
    # the method's own metrics are logged every step, averaged over the step's micro-batches
    assert [row["weight_mean"] for row in history] == [0.5, 0.5, 0.5]
    # and its loss is its own: half the unweighted per-row loss
    assert all(row["loss"] == pytest.approx(0.5 * row["unweighted_loss"], rel=1e-4) for row in history)
    assert metrics["summary"]["method_metrics"]["weight_mean"] == 0.5
    assert (tmp_path / "out" / "training_curves.png").is_file() and (tmp_path / "out" / "model.safetensors").is_file()


def test_the_method_decides_the_loss_a_zero_weight_trains_nothing(weighted_env, ft_tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    config = write_config(tmp_path, ft_tiny_model_dir, weight=0.0)
    result = ft(weighted_env, "run", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    before = load_file(ft_tiny_model_dir / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert all((after[k] == before[k]).all() for k in before)  # zero loss, zero gradients: no update


def test_a_format_without_the_method_columns_is_refused_before_any_model_loads(weighted_env, tmp_path):
    config = write_config(tmp_path, Path("no/such/model"), weight=1.0, dataset_type="completion")
    result = ft(weighted_env, "validate", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert f"{config}:5: datasets[0].type: dataset type 'completion' gives input_ids, labels, but method " \
           "'weighted_sft' needs input_ids, labels, weight (missing: weight). Types for this method: weighted." \
           in result.stderr


def test_features_are_opt_in_packing_a_method_that_did_not_declare_it_is_a_config_error(weighted_env, tmp_path):
    config = write_config(tmp_path, Path("no/such/model"), weight=1.0)
    result = ft(weighted_env, "validate", str(config), "-p", "packing", cwd=tmp_path)
    assert result.returncode != 0
    assert ("plugin 'packing' needs packing, which method 'weighted_sft' does not support (its Method.features do "
            "not list 'packing'); remove it (or pass -p no:packing).") in result.stderr
    # what it declared applies: eval data is accepted
    config.write_text(config.read_text() + "val_set_size: 2\n")
    result = ft(weighted_env, "validate", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_method_declares_its_features_none_by_default():
    from ft.api import Method

    bare = Method("bare", ("input_ids", "labels"), collator=lambda cfg, tok: None, trainer_class=lambda: object)
    assert bare.features == frozenset() and not bare.supports("packing")


def test_an_unknown_method_is_a_config_error_with_a_suggestion(tmp_path):
    from ft.kernel.context import load_context
    from ft.kernel.errors import ConfigError

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(f"base_model: m\nmethod: stf\ndatasets:\n  - path: {data}\n    type: completion\n")
    with pytest.raises(ConfigError) as info:
        load_context(config)
    assert f"{config}:2: method: unknown training method 'stf'. Did you mean 'sft'?" in str(info.value)


# -- errors in a method's own code name its plugin, the place and file:line ------------------------------


def broken_method(fails: str):
    """A method plugin whose own code raises where ``fails`` says: its loss, its collator, or a trainer_kwargs
    key its Trainer does not take."""
    from ft import hookimpl
    from ft.api import SFT_COLUMNS, Method, PaddingCollator

    def collator(cfg, tokenizer):
        pad = PaddingCollator(tokenizer.pad_token_id)

        def collate(rows):
            if fails == "collator":
                raise KeyError("weight")
            return pad(rows)

        return collate

    def trainer_class():
        from transformers import Trainer

        class BrokenTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if fails == "loss":
                    raise ValueError("bad loss maths")
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        return BrokenTrainer

    def trainer_kwargs(cfg, model, tokenizer, data):
        return {"no_such_argument": 1} if fails == "kwargs" else {}

    class Plugin:
        @hookimpl
        def ft_register_methods(register):
            register.add(Method("broken_sft", SFT_COLUMNS, collator, trainer_class, trainer_kwargs=trainer_kwargs))

    return Plugin, (collator, trainer_class, trainer_kwargs)


@pytest.mark.usefixtures("ft_one_torch_thread")
@pytest.mark.parametrize("fails", ["loss", "collator", "kwargs"])
def test_an_exception_in_a_methods_own_code_names_its_plugin_and_line(fails, ft_tiny_model_dir, tmp_path):
    """compute_loss, the collator and the Trainer's keyword arguments raised raw tracebacks naming neither the
    method nor its plugin; now they read like a callback's error."""
    from ft.kernel.errors import PluginHookError
    from ft.run import run
    from ft.tools.testing import registered_plugin
    from ft.tools.tiny import make_chat_rows, write_jsonl

    plugin, (collator, trainer_class, trainer_kwargs) = broken_method(fails)
    data = write_jsonl(tmp_path / "chat.jsonl", make_chat_rows(8))
    config = {"base_model": str(ft_tiny_model_dir), "method": "broken_sft", "sequence_len": 64, "micro_batch_size": 4,
              "max_steps": 1, "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prep"),
              "datasets": [{"path": str(data), "type": "chat_template"}]}
    with registered_plugin(plugin, "broken_method"), pytest.raises(PluginHookError) as info:
        run(config)
    text = str(info.value)
    where = "plugin 'broken_method' failed in method 'broken_sft': "
    if fails == "loss":
        assert where + "its Trainer's compute_loss: ValueError: bad loss maths" in text
        assert f"at {__file__}:" in text and 'raise ValueError("bad loss maths")' in text
    elif fails == "collator":
        assert where + "its collator: KeyError: 'weight'" in text
        assert f"at {__file__}:" in text and 'raise KeyError("weight")' in text
    else:
        assert where + "its Trainer BrokenTrainer (class broken_method.<locals>.trainer_class.<locals>.BrokenTrainer " \
                       f"at {__file__}:" in text
        assert "built with the keys its trainer_kwargs returned (no_such_argument; function " \
               f"broken_method.<locals>.trainer_kwargs at {__file__}:{trainer_kwargs.__code__.co_firstlineno}): " \
               "TypeError: Trainer.__init__() got an unexpected keyword argument 'no_such_argument'" in text
    assert not (tmp_path / "out" / "model.safetensors").exists()
