"""``method: prm``: the ``stepwise_supervised`` layout (a label on the last separator token of each step,
-100 elsewhere) against a hand-computed one, bad rows dropped with their reason, and a short tiny-model
run whose held-out step accuracy beats the majority class, saved as a token classifier."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ft.kernel.context import load_context

M = -100


def config_of(tmp_path: Path, model_dir: Path, rows: list[dict], **extra) -> dict:
    from ft.tools.tiny import write_jsonl

    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    entry = {"path": str(data), "type": "stepwise_supervised", **extra.pop("entry", {})}
    return {"base_model": str(model_dir), "method": "prm", "datasets": [entry], "sequence_len": 256,
            "shuffle": False, "micro_batch_size": 4, "dataset_prepared_path": str(tmp_path / "prepared"),
            "output_dir": str(tmp_path / "out"), "dataset_num_proc": 1, **extra}


def prepare(tmp_path, model_dir, rows, **extra):
    from ft.engine.data import prepare_datasets

    ctx = load_context(config_of(tmp_path, model_dir, rows, **extra))
    tokenizer = ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg)
    return prepare_datasets(ctx, tokenizer), tokenizer


ROW = {"prompt": "What is 2 plus 3?", "completions": ["Two plus three", "is 6."], "labels": [True, False]}


@pytest.mark.parametrize("last_only", [False, True])
def test_labels_sit_on_the_last_separator_token_of_each_step(tmp_path, ft_tiny_model_dir, ft_tiny_tokenizer, last_only):
    prepared, _ = prepare(tmp_path, ft_tiny_model_dir, [ROW],
                          entry={"step_separator": " ;\n", "train_on_last_step_only": last_only})
    row = prepared.train[0]

    def ids(text):
        return ft_tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt, step1, step2, sep = ids(ROW["prompt"]), ids("Two plus three"), ids("is 6."), ids(" ;\n")
    assert len(sep) >= 2  # a multi-token separator: the label goes on its last token only
    assert ft_tiny_tokenizer.bos_token_id is None  # the tiny tokenizer has no BOS to put first
    first = M if last_only else 1
    expected_ids = prompt + step1 + sep + step2 + sep
    expected_labels = ([M] * len(prompt) + [M] * (len(step1) + len(sep) - 1) + [first]
                       + [M] * (len(step2) + len(sep) - 1) + [0])
    assert row["prm_input_ids"] == expected_ids
    assert row["prm_labels"] == expected_labels
    scored = [i for i, x in enumerate(row["prm_labels"]) if x != M]
    ends = [len(prompt) + len(step1) + len(sep) - 1, len(expected_ids) - 1]
    assert scored == (ends[1:] if last_only else ends)


def test_bad_rows_are_dropped_with_their_line_and_reason(tmp_path, ft_tiny_model_dir):
    rows = [ROW, {**ROW, "labels": [True]}, {**ROW, "completions": []}, {**ROW, "labels": [True, "yes"]},
            {**ROW, "labels": [1, 0]}]
    prepared, _ = prepare(tmp_path, ft_tiny_model_dir, rows)
    assert len(prepared.train) == 2
    report = json.dumps(prepared.report)
    assert "steps.jsonl:2" in report and "one label per step (2 steps, labels: 1)" in report
    assert "steps.jsonl:3" in report and "non-empty list of texts" in report
    assert "steps.jsonl:4" in report and "label 'yes'" in report


def test_prm_refuses_sft_data_before_loading_a_model(tmp_path):
    from ft.kernel.errors import ConfigError

    config = config_of(tmp_path, Path("no/model"), [ROW])
    config["datasets"][0]["type"] = "chat_template"
    with pytest.raises(ConfigError) as info:
        load_context(config)
    assert "method 'prm' needs prm_input_ids, prm_labels" in "\n".join(info.value.problems)


def step_rows(n: int, seed: int) -> list[dict]:
    """Steps that say 'blue' are good, 'red' bad (about 60% good)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(2, 4)
        good = [rng.random() < 0.6 for _ in range(k)]
        steps = [f"the {rng.choice(['cat', 'dog', 'fish'])} is {'blue' if g else 'red'}" for g in good]
        rows.append({"prompt": f"Question {rng.randint(0, 99)}:", "completions": steps, "labels": good})
    return rows


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_a_short_run_beats_the_majority_class_on_held_out_steps(tmp_path, ft_tiny_model_dir):
    import torch
    from transformers import AutoModelForTokenClassification

    from ft.run import run

    result = run(config_of(tmp_path, ft_tiny_model_dir, step_rows(48, seed=0), max_steps=30, learning_rate=3e-3,
                           logging_steps=5, shuffle=True, seed=0))
    assert result.metrics["steps"] == 30
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert {"step_accuracy", "good_step_rate"} <= set(history[-1])
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(model).__name__ == "LlamaForTokenClassification" and model.config.num_labels == 2

    held_out, _ = prepare(tmp_path / "eval", ft_tiny_model_dir, step_rows(24, seed=5))
    right = total = good = 0
    for row in held_out.train:
        labels = torch.tensor(row["prm_labels"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["prm_input_ids"]])).logits[0]
        scored = labels != M
        right += int((logits[scored].argmax(-1) == labels[scored]).sum())
        total += int(scored.sum())
        good += int(labels[scored].sum())
    majority = max(good, total - good) / total
    assert right / total > majority + 0.1, (right / total, majority)


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_under_lora_the_token_head_trains_in_full_and_ft_merge_writes_a_token_classifier(tmp_path, ft_tiny_model_dir):
    import torch
    from ft_plugins.lora import load_adapter_model, merge_adapter
    from transformers import AutoModelForTokenClassification

    from ft.run import run

    result = run(config_of(tmp_path, ft_tiny_model_dir, step_rows(16, seed=0), max_steps=3, plugins=["lora"]))
    out = Path(result.output_dir)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "TOKEN_CLS" and "score" in adapter["modules_to_save"]
    peft_model, tokenizer = load_adapter_model(out)
    merged = AutoModelForTokenClassification.from_pretrained(merge_adapter(out), dtype=torch.float32)
    assert merged.config.num_labels == 2
    ids = torch.tensor([tokenizer("Question 1: the cat is blue\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_a_method_head_is_checked_when_it_is_declared(tmp_path):
    from ft.api import SEQUENCE_CLASSIFICATION, Method, model_head

    def nothing(*args):
        return None

    with pytest.raises(ValueError, match="head must be one of causal_lm, sequence_classification"):
        Method("x", ("input_ids",), nothing, nothing, head="regression")
    with pytest.raises(ValueError, match="num_labels goes with a classification head"):
        Method("x", ("input_ids",), nothing, nothing, head=SEQUENCE_CLASSIFICATION)
    cfg = load_context(config_of(tmp_path, Path("no/model"), [ROW])).cfg
    assert model_head(cfg) == ("token_classification", 2)
