"""``method: reward_model``: the Bradley-Terry loss and its gradients equal TRL 1.16's RewardTrainer on a
fixed batch; the margin column and its checks; a trained reward model loads as a transformers sequence
classifier and GRPO's ``reward_model`` reward scores with it (the RLHF loop closes); under lora the score
head trains in full and ``ft merge`` writes a classifier."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from test_preference_trl import assert_same, loss_and_grads

from ft.kernel.context import load_context

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ft_one_torch_thread")]


def pair_rows(n: int = 6, seed: int = 0, margin: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        row = {"prompt": [{"role": "user", "content": f"What is {a} plus {b}?" + " Please answer." * (i % 3)}],
               "chosen": f"The result is {a + b}." + " Easy." * (i % 2),
               "rejected": f"It is {a + b + 1}, I think." + " Maybe not." * (i % 3)}
        if margin:
            row["score_gap"] = 0.25 * i
        rows.append(row)
    return rows


def config_of(tmp_path: Path, model_dir: Path, rows: list[dict], **extra) -> dict:
    from ft.tools.tiny import write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    entry = {"path": str(data), "type": "preference", **extra.pop("entry", {})}
    return {"base_model": str(model_dir), "method": "reward_model", "datasets": [entry], "sequence_len": 128,
            "shuffle": False, "micro_batch_size": len(rows), "dataset_prepared_path": str(tmp_path / "prepared"),
            "output_dir": str(tmp_path / "out"), "dataset_num_proc": 1, **extra}


@pytest.mark.parametrize("margin, center", [(False, None), (True, 0.01)])
def test_loss_and_gradients_equal_trl_reward_trainer(tmp_path, ft_tiny_model_dir, margin, center):
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from ft.engine.data import prepare_datasets
    from ft.engine.train import build_trainer

    rows = pair_rows(margin=margin)
    extra = {"entry": {"field_margin": "score_gap"}} if margin else {}
    if center is not None:
        extra["reward_model"] = {"center_rewards_coefficient": center}
    ctx = load_context(config_of(tmp_path, ft_tiny_model_dir, rows, **extra))
    tokenizer = ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg)
    prepared = prepare_datasets(ctx, tokenizer)
    ft_rows = [prepared.train[i] for i in range(len(prepared.train))]
    assert len(ft_rows) == len(rows)
    model = ctx.pm.call("ft_load_model", cfg=ctx.cfg, kwargs={"dtype": torch.float32, "attn_implementation": "eager"}, tokenizer=tokenizer)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    with torch.no_grad():  # a trained-looking score head, not the tiny init's near-zero one
        model.score.weight.normal_(0, 0.5)
    trainer = build_trainer(ctx, model, tokenizer, prepared)
    batch = trainer.data_collator(ft_rows)
    if margin:
        assert batch["margin"].tolist() == [0.25 * i for i in range(len(rows))]
    ft_loss, ft_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)), model)

    trl_model = type(model).from_pretrained(ft_tiny_model_dir, num_labels=1, dtype=torch.float32,
                                            attn_implementation="eager")
    trl_model.load_state_dict(model.state_dict())
    args = RewardConfig(output_dir=str(tmp_path / "trl"), center_rewards_coefficient=center, report_to=[],
                        use_cpu=True, bf16=False, per_device_train_batch_size=len(rows))
    trl_trainer = RewardTrainer(model=trl_model, args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_list([{"chosen": "It is 2.", "rejected": "It is 3."}]))
    examples = [{"chosen_ids": r["chosen_input_ids"], "rejected_ids": r["rejected_input_ids"],
                 **({"margin": r["margin"]} if margin else {})} for r in ft_rows]
    trl_batch = trl_trainer.data_collator(examples)
    trl_model.train()
    trl_loss, trl_grads = loss_and_grads(lambda: trl_trainer.compute_loss(trl_model, trl_batch), trl_model)
    assert_same(ft_loss, ft_grads, trl_loss, trl_grads)
    assert ft_loss.item() > 0.1  # not a saturated loss where every gradient vanishes


def test_a_margin_that_is_not_a_number_drops_the_row_and_other_methods_refuse_a_margin(tmp_path, ft_tiny_model_dir):
    from ft.engine.data import prepare_datasets
    from ft.kernel.errors import FtError

    rows = pair_rows(margin=True)
    rows[2]["score_gap"] = "big"
    ctx = load_context(config_of(tmp_path, ft_tiny_model_dir, rows, entry={"field_margin": "score_gap"}))
    prepared = prepare_datasets(ctx, ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg))
    assert len(prepared.train) == len(rows) - 1
    report = json.dumps(prepared.report)
    assert "malformed row" in report and "pairs.jsonl:3" in report and "'score_gap' must be a number" in report

    dpo = config_of(tmp_path / "dpo", ft_tiny_model_dir, pair_rows(), entry={"field_margin": "score_gap"})
    dpo["method"] = "dpo"
    ctx = load_context(dpo)
    with pytest.raises(FtError, match="datasets\\[0\\].field_margin: a pair's margin is used by method reward_model"):
        prepare_datasets(ctx, ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg))


def separable_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"The result is {a + b}. Thanks!",
                     "rejected": f"no {rng.choice(['cat', 'dog', 'fish'])} {rng.choice(['red', 'blue'])}"})
    return rows


def train_reward_model(tmp_path: Path, model_dir: Path, *plugins: str, steps: int = 30) -> Path:
    from ft.run import run

    config = config_of(tmp_path, model_dir, separable_pairs(32, seed=1), micro_batch_size=8, max_steps=steps,
                       learning_rate=3e-3, logging_steps=5, shuffle=True, seed=0,
                       plugins=list(plugins), **({"lora": {"r": 8, "alpha": 16}} if plugins else {}))
    result = run(config)
    assert result.metrics["steps"] == steps
    return Path(result.output_dir)


def held_out_accuracy(model, tokenizer, rows) -> float:
    import torch

    wins = 0
    for row in rows:
        scores = []
        for side in ("chosen", "rejected"):
            text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                                  {"role": "assistant", "content": row[side]}], tokenize=False)
            with torch.no_grad():
                scores.append(float(model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]))
        wins += scores[0] > scores[1]
    return wins / len(rows)


def test_a_trained_reward_model_loads_as_a_classifier_and_grpo_uses_it(tmp_path, ft_tiny_model_dir):
    """Train a reward model (full fine-tune), load it with plain transformers, then run GRPO with it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ft.run import run

    rm_dir = train_reward_model(tmp_path / "rm", ft_tiny_model_dir)
    history = json.loads((rm_dir / "metrics.json").read_text())["history"]
    assert {"accuracy", "margin", "mean_reward"} <= set(history[-1])
    assert history[-1]["margin"] > history[0]["margin"]
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.num_labels == 1
    assert rm.config.pad_token_id == tokenizer.pad_token_id is not None
    assert held_out_accuracy(rm, tokenizer, separable_pairs(16, seed=7)) >= 0.9

    from test_grpo import grpo_config  # the GRPO tests' config (prompts "What is a plus b?")

    (tmp_path / "grpo").mkdir()
    config = grpo_config(tmp_path / "grpo", ft_tiny_model_dir, max_steps=2,
                         grpo={"rewards": [{"name": "reward_model", "model": str(rm_dir), "batch_size": 4}]})
    result = run(config)
    assert result.metrics["steps"] == 2
    grpo_history = json.loads((tmp_path / "grpo" / "out" / "metrics.json").read_text())["history"]
    assert all(math.isfinite(r["reward/reward_model/mean"]) for r in grpo_history)
    line = json.loads((tmp_path / "grpo" / "out" / "completions.jsonl").read_text().splitlines()[0])
    text = tokenizer.apply_chat_template([*line["prompt"], {"role": "assistant", "content": line["completion"]}],
                                         tokenize=False)
    with torch.no_grad():
        expected = float(rm(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
    assert line["rewards"]["reward_model"] == pytest.approx(expected, abs=1e-4)


def test_under_lora_the_score_head_trains_in_full_and_ft_merge_writes_a_classifier(tmp_path, ft_tiny_model_dir):
    import torch
    from ft_plugins.lora import load_adapter_model, merge_adapter
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = train_reward_model(tmp_path / "rm", ft_tiny_model_dir, "lora", steps=20)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as fh:
        head = [k for k in fh.keys() if k.endswith("score.weight")]
        assert head and fh.get_tensor(head[0]).shape == (1, 64)
    peft_model, tokenizer = load_adapter_model(out)
    merged_dir = Path(merge_adapter(out))
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32)
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"},
                                          {"role": "assistant", "content": "The result is 5. Thanks!"}], tokenize=False)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert float(merged(**inputs).logits[0, 0]) == pytest.approx(float(peft_model(**inputs).logits[0, 0]), abs=1e-4)
    assert held_out_accuracy(merged, AutoTokenizer.from_pretrained(merged_dir), separable_pairs(16, seed=7)) > 0.5

    from ft_plugins.rewards import RewardModelOptions, reward_model

    from ft.kernel.errors import FtError

    with pytest.raises(FtError, match=f"holds a LoRA adapter .* run `ft merge {out}` and set model: {out}/merged"):
        reward_model(RewardModelOptions(model=str(out)), load_context(config_of(tmp_path, ft_tiny_model_dir, pair_rows())).cfg)
