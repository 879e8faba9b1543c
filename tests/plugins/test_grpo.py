"""GRPO as a method plugin: the prompt format, the config checks, the shipped rewards, and runs on the
tiny model (metrics, sample completions, reward errors, NaN rewards, lora/qlora with a reference)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ft import hookimpl
from ft.kernel.context import load_context
from ft.kernel.errors import ConfigError, FtError
from ft.tools.testing import install_distribution, registered_plugin

QUESTION = "What is {a} plus {b}?"


def write_prompts(path: Path, n: int = 16, seed: int = 0, chat: bool = True) -> Path:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        text = QUESTION.format(a=a, b=b)
        rows.append({"prompt": [{"role": "user", "content": text}] if chat else text, "answer": str(a + b),
                     "level": a % 3})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_config(root: Path, model_dir: Path, *, grpo: dict | None = None, **overrides) -> Path:
    data = write_prompts(root / "prompts.jsonl")
    config = {
        "base_model": str(model_dir),
        "method": "grpo",
        "datasets": [{"path": str(data), "type": "prompt"}],
        "sequence_len": 64,
        "dataset_prepared_path": str(root / "prepared"),
        "dataset_num_proc": 1,
        "output_dir": str(root / "out"),
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        "logging_steps": 1,
        "learning_rate": 1.0e-3,
        "seed": 3,
        "grpo": {"num_generations": 4, "max_completion_len": 8,
                 "rewards": [{"name": "length_penalty", "unit": "characters", "target": 10},
                             {"name": "regex_match", "pattern": "{answer}", "weight": 0.5}],
                 **(grpo or {})},
        **overrides,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def problems_of(config) -> str:
    with pytest.raises(ConfigError) as info:
        load_context(config)
    return "\n".join(info.value.problems)


# -- config checks (no model) -------------------------------------------------------------------------


def test_an_unknown_reward_is_refused_with_file_line_and_a_suggestion(tmp_path):
    config = grpo_config(tmp_path, Path("no/model"), grpo={"rewards": [{"name": "exact_mach"}]})
    text = problems_of(config)
    assert f"{config}:" in text
    assert "grpo.rewards[0].name: unknown reward 'exact_mach'. Did you mean 'exact_match'?" in text


def test_reward_options_are_validated_with_their_location(tmp_path):
    config = grpo_config(tmp_path, Path("no/model"), grpo={"rewards": [
        {"name": "regex_match", "pattern": "(unclosed"},
        {"name": "length_penalty", "traget": 10},
        {"name": "exact_match", "weight": 2.0, "extract": "#### (\\d+)"},
    ]})
    text = problems_of(config)
    assert "grpo.rewards[0].pattern: Value error, not a valid regular expression" in text
    assert "grpo.rewards[1].traget: reward 'length_penalty' has no option 'traget'; its options: target, per_token" in text
    assert "rewards[2]" not in text  # a valid entry


def test_reward_problems_are_reported_with_the_sections_other_problems(tmp_path):
    """A grpo section error does not hide the rewards' errors until it is fixed: one pass lists them all."""
    config = grpo_config(tmp_path, Path("no/model"), grpo={"num_generations": 1, "rewards": [
        {"name": "length_penalty", "traget": 10}, {"name": "length_penalty", "target": -1}, {"name": "exact_mach"}]})
    text = problems_of(config)
    assert "grpo.num_generations: Input should be greater than or equal to 2" in text
    assert "grpo.rewards[0].traget: reward 'length_penalty' has no option 'traget'" in text
    assert "grpo.rewards[1].target: Input should be greater than or equal to 0 (reward 'length_penalty') (got -1)" in text
    assert "grpo.rewards[2].name: unknown reward 'exact_mach'. Did you mean 'exact_match'?" in text


def test_groups_must_fit_in_a_step_and_rewards_are_needed(tmp_path):
    config = grpo_config(tmp_path, Path("no/model"), micro_batch_size=3, gradient_accumulation_steps=1,
                         grpo={"rewards": []})
    text = problems_of(config)
    assert "micro_batch_size: micro_batch_size x gradient_accumulation_steps (3 x 1 = 3 completions per device and " \
           "step) must be a multiple of grpo.num_generations (4)" in text
    assert "method grpo needs at least one reward" in text


def test_sft_formats_and_features_are_refused_for_grpo(tmp_path):
    config = grpo_config(tmp_path, Path("no/model"), plugins=["packing"], val_set_size=0.1)
    raw = yaml.safe_load(config.read_text())
    raw["datasets"][0]["type"] = "chat_template"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    text = problems_of(config)
    assert "dataset type 'chat_template' gives input_ids, labels, but method 'grpo' needs input_ids, prompt " \
           "(missing: prompt). Types for this method: prompt, prompt_reference, strided." in text
    assert "plugin 'packing' needs packing, which method 'grpo' does not support" in text
    assert "method 'grpo' has no evaluation; remove val_set_size." in text


def test_a_grpo_section_without_method_grpo_is_refused(tmp_path):
    config = grpo_config(tmp_path, Path("no/model"))
    raw = yaml.safe_load(config.read_text())
    del raw["method"]
    raw["datasets"][0]["type"] = "chat_template"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "section 'grpo' configures method 'grpo', but the method is 'sft'. Set `method: grpo`" in problems_of(config)


def test_vllm_needs_a_generating_method(tmp_path, chat_jsonl):
    config = {"base_model": "m", "datasets": [{"path": str(chat_jsonl), "type": "chat_template"}], "plugins": ["vllm"]}
    with pytest.raises(ConfigError) as info:
        load_context(config)
    assert "plugin 'vllm' needs generation, which method 'sft' does not support" in str(info.value)


# -- the prompt format ---------------------------------------------------------------------------------


def test_prompts_are_rendered_with_the_generation_prompt_and_keep_every_column(ft_tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from ft.run import preprocess

    config = grpo_config(tmp_path, ft_tiny_model_dir)
    rows = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Once upon a time", "answer": "x", "level": 1}) + "\n"
                     + json.dumps({"question": "no prompt field"}) + "\n"
                     + json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    raw = yaml.safe_load(config.read_text())
    raw["datasets"].append({"path": str(plain), "type": "prompt"})
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    data, tok = preprocess(load_context(config))
    ref = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    got = {tuple(r["input_ids"]): r for r in data.train}
    for row in rows:
        ids = ref.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        sample = got[tuple(ids)]
        assert tok.decode(ids).endswith("<|im_start|>assistant\n")
        assert json.loads(sample["prompt"]) == row["prompt"]  # kept as written, as JSON text
        assert sample["answer"] == row["answer"] and sample["level"] == row["level"]
    assert tuple(ref("Once upon a time")["input_ids"]) in got  # a plain prompt is used as it is
    assert len(data.train) == len(rows) + 1
    report = data.report if hasattr(data, "report") else None
    if report is not None:
        text = str(report)
        assert "missing field 'prompt'" in text and "malformed messages" in text


def test_a_column_named_like_a_reward_argument_is_an_error_naming_the_row(ft_tiny_model_dir, tmp_path):
    from ft.run import preprocess

    config = grpo_config(tmp_path, ft_tiny_model_dir)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "hi", "completions": 3}) + "\n")
    with pytest.raises(FtError) as info:
        preprocess(load_context(config))
    assert f"{tmp_path / 'prompts.jsonl'}:1" in str(info.value)
    assert "column 'completions' has a name ft uses itself" in str(info.value)


# -- the shipped rewards --------------------------------------------------------------------------------


def reward(name: str, **options):
    from ft_plugins import rewards

    registered = {"exact_match": (rewards.exact_match, rewards.ExactMatchOptions),
                  "regex_match": (rewards.regex_match, rewards.RegexMatchOptions),
                  "json_schema": (rewards.json_schema, rewards.JsonSchemaOptions),
                  "length_penalty": (rewards.length_penalty, rewards.LengthPenaltyOptions)}[name]
    factory, model = registered
    return factory(model(**options), None)


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_exact_match_compares_with_the_answer_column():
    fn = reward("exact_match", extract=r"answer is (\d+)")
    got = fn(prompts=["q"] * 4, completions=[chat("The answer is 7."), chat("the answer is 8"), "no number", "x"],
             completion_ids=[[1]] * 4, answer=["7", "7", "7", None])
    assert got == [1.0, 0.0, 0.0, None]
    assert reward("exact_match")(prompts=["q"], completions=[" 12 "], completion_ids=[[1]], answer=[12]) == [1.0]
    with pytest.raises(FtError, match="reward 'exact_match' compares with column 'answer', which the rows do not have"):
        reward("exact_match")(prompts=["q"], completions=["1"], completion_ids=[[1]], solution=["1"])


def test_regex_match_fills_columns_into_the_pattern():
    fn = reward("regex_match", pattern=r"The result is {answer}\.")
    got = fn(prompts=["q"] * 3, completions=["The result is 1+1.", "The result is 11.", "The result is 2."],
             completion_ids=[[1]] * 3, answer=["1+1", "1", "2"])
    assert got == [1.0, 0.0, 1.0]  # the answer is escaped: '+' is literal
    full = reward("regex_match", pattern=r"\d+", full=True)
    assert full(prompts=["q"] * 2, completions=["42", "42 apples"], completion_ids=[[1]] * 2) == [1.0, 0.0]


def test_json_schema_needs_valid_json_that_matches():
    pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    fn = reward("json_schema", schema=schema)
    got = fn(prompts=["q"] * 4, completion_ids=[[1]] * 4, completions=[
        chat('{"name": "Ada", "age": 36}'), chat('```json\n{"name": "Ada", "age": 36}\n```'),
        chat('{"name": "Ada", "age": "36"}'), chat("not json")])
    assert got == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(FtError, match="not a valid JSON Schema"):
        reward("json_schema", schema={"type": "no-such-type"})


def test_length_penalty_counts_tokens_or_characters():
    fn = reward("length_penalty", target=3, per_token=0.5)
    assert fn(prompts=["q"] * 3, completions=["a", "b", "c"], completion_ids=[[1], [1, 2, 3], [1] * 5]) == [0.0, 0.0, -1.0]
    both = reward("length_penalty", target=4, per_token=1.0, unit="characters", two_sided=True)
    assert both(prompts=["q"] * 2, completions=["ab", "abcdef"], completion_ids=[[1], [1]]) == [-2.0, -2.0]


# -- what a reward returns, and how long it may take ------------------------------------------------------


def scored(*fns, n: int = 4, **kwargs):
    """``score`` of reward functions (named after themselves, plugin 'mine') on n plain-text completions."""
    from ft_plugins.grpo import RewardFunction, score

    rewards = [RewardFunction(fn.__name__, 1.0, fn, "mine") for fn in fns]
    return score(rewards, ["q"] * n, [f"c{i}" for i in range(n)], [[1]] * n, {"answer": ["1"] * n}, **kwargs)


def only_none(prompts, completions, completion_ids, **columns):
    return [None] * len(completions)


def test_a_reward_that_returns_only_none_stops_the_run_with_its_name_and_line():
    """None everywhere trained nothing (loss and grad_norm 0) without a word; it is an error naming the reward."""
    with pytest.raises(FtError) as info:
        scored(only_none)
    text = str(info.value)
    line = only_none.__code__.co_firstlineno
    assert f"every reward returned None for all 4 completions of this step (reward 'only_none' (plugin 'mine', " \
           f"function only_none at {__file__}:{line}))" in text
    assert "nothing would be learned" in text


def test_none_for_some_completions_or_from_one_of_two_rewards_is_allowed():
    """As in TRL: None = the reward does not apply there; a completion no reward scores is left out (NaN)."""
    def half(prompts, completions, completion_ids, **columns):
        return [1.0, None, 0.5, None]

    values, unset = scored(half, only_none)
    assert unset == [[False, True, False, True], [True] * 4]
    assert values[0][0] == 1.0 and math.isnan(values[0][1]) and all(math.isnan(v) for v in values[1])


def test_numpy_arrays_and_tensors_are_taken_and_wrong_lengths_refused():
    import numpy as np
    import torch

    def as_numpy(prompts, completions, completion_ids, **columns):
        return np.array([0.5, 1.0, 0.0, 2.0], dtype=np.float32)

    def as_tensor(prompts, completions, completion_ids, **columns):
        return torch.tensor([1.0, 2.0, 3.0, 4.0])

    values, unset = scored(as_numpy, as_tensor)
    assert values == [[0.5, 1.0, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0]] and not any(map(any, unset))

    def too_few(prompts, completions, completion_ids, **columns):
        return [1.0] * 3

    def column(prompts, completions, completion_ids, **columns):
        return np.ones((4, 1))

    def one_number(prompts, completions, completion_ids, **columns):
        return 1.0

    with pytest.raises(FtError, match=r"reward 'too_few' \(plugin 'mine', function .*too_few at .*test_grpo.py:\d+\) "
                                      r"returned 3 values for 4 completions"):
        scored(too_few)
    with pytest.raises(FtError, match=r"reward 'column' .* returned an array of shape \(4, 1\) for 4 completions"):
        scored(column)
    with pytest.raises(FtError, match=r"reward 'one_number' .* returned float 1.0 for 4 completions; a reward function "
                                      "returns a list"):
        scored(one_number)


def test_a_reward_over_its_time_limit_is_an_error_naming_it_and_where_it_was():
    import threading

    release = threading.Event()

    def stuck(prompts, completions, completion_ids, **columns):
        release.wait(60)
        return [0.0] * len(completions)

    try:
        with pytest.raises(FtError) as info:
            scored(stuck, timeout=0.3)
    finally:
        release.set()
    text = str(info.value)
    assert "reward 'stuck' (plugin 'mine', function " in text
    assert "did not return within grpo.reward_timeout (0.3 s) for 4 completions; it was running " in text
    assert "raise grpo.reward_timeout (null: no limit)" in text


def test_a_stop_request_ends_the_wait_on_a_reward():
    import threading

    release, asked = threading.Event(), []

    class Abandoned(Exception):
        pass

    def stuck(prompts, completions, completion_ids, **columns):
        release.wait(60)
        return [0.0] * len(completions)

    def check_stop(doing):
        asked.append(doing)
        if len(asked) == 3:
            raise Abandoned(doing)

    try:
        with pytest.raises(Abandoned, match="waiting for reward 'stuck'"):
            scored(stuck, check_stop=check_stop)
    finally:
        release.set()


# -- runs on the tiny model -----------------------------------------------------------------------------

run_marks = [pytest.mark.slow, pytest.mark.usefixtures("ft_one_torch_thread")]


@pytest.fixture(scope="module")
def trained(ft_tiny_model_dir, tmp_path_factory):
    """One run: 2 prompts x 4 completions per step (micro-batches of 4, accumulation 2), beta 0.05."""
    from ft.run import run

    root = tmp_path_factory.mktemp("grpo-run")
    config = grpo_config(root, ft_tiny_model_dir, max_steps=4, grpo={"beta": 0.05, "log_completions_steps": 3})
    return root, run(config)


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_a_run_logs_rewards_length_clip_ratio_kl_and_entropy(trained, ft_tiny_model_dir):
    from safetensors.torch import load_file

    root, result = trained
    out = root / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    for row in history:
        for key in ("reward", "reward_std", "reward/length_penalty/mean", "reward/length_penalty/std",
                    "reward/regex_match/mean", "reward/regex_match/std", "completion_length", "clip_ratio", "kl",
                    "entropy", "loss", "grad_norm"):
            assert key in row and math.isfinite(row[key]), (key, row)
        assert 1 <= row["completion_length"] <= 8
        assert row["reward/regex_match/mean"] in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
        # the weighted reward is the sum of the weighted rewards' means
        assert row["reward"] == pytest.approx(row["reward/length_penalty/mean"] + 0.5 * row["reward/regex_match/mean"],
                                              abs=1e-5)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    assert history[-1]["kl"] > 0
    assert metrics["summary"]["method"] == "grpo"
    assert metrics["summary"]["warnings"] == []  # the health watch does not judge an RL loss as an SFT loss
    assert "reward/length_penalty/mean" in metrics["summary"]["method_metrics"]
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "grpo_curves.png").stat().st_size > 10_000  # rewards, length and policy statistics apart
    # 2 prompts x 4 completions per step, 8 tokens at most each, trained tokens = completion tokens
    assert metrics["summary"]["trained_tokens"] == pytest.approx(sum(r["completion_length"] for r in history) * 8)
    before, after = load_file(ft_tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not (before[k] == after[k]).all() for k in before)


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_sample_completions_are_logged_every_n_steps(trained):
    root, _ = trained
    lines = [json.loads(x) for x in (root / "out" / "completions.jsonl").read_text().splitlines()]
    assert sorted({x["step"] for x in lines}) == [1, 3]
    assert len(lines) == 2 * 8  # every completion of the logged steps
    first = lines[0]
    assert first["prompt"][0]["role"] == "user" and isinstance(first["completion"], str)
    assert set(first["rewards"]) == {"length_penalty", "regex_match"}
    assert first["reward"] == pytest.approx(first["rewards"]["length_penalty"] + 0.5 * first["rewards"]["regex_match"],
                                            abs=1e-5)
    groups = [lines[i:i + 4] for i in range(0, 8, 4)]
    for group in groups:  # advantages are relative to the group: they sum to ~0
        assert len({json.dumps(x["prompt"]) for x in group}) == 1
        assert abs(sum(x["advantage"] for x in group)) < 1e-3


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_rewards_that_never_differ_within_a_group_are_reported_as_no_signal(ft_tiny_model_dir, tmp_path):
    from ft.run import run

    # the random tiny model never answers a sum right: every completion scores 0, every advantage is 0
    config = grpo_config(tmp_path, ft_tiny_model_dir, max_steps=5, gradient_accumulation_steps=1,
                         grpo={"rewards": [{"name": "exact_match"}]})
    result = run(config)
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert all(r["grad_norm"] == 0.0 and r["frac_reward_zero_std"] == 1.0 for r in history)
    (warning,) = result.metrics["warnings"]  # and not health's "frozen weights" for the zero gradient
    assert warning["check"] == "grpo_no_signal" and warning["step"] == 5
    assert "every group's completions got the same reward" in warning["message"]


class FailingReward:
    """Rewards that misbehave on the prompt whose answer is 7."""

    @hookimpl
    def ft_register_rewards(register):
        def crashes(prompts, completions, completion_ids, answer, **kwargs):
            return [1.0 / (int(a) - 7) for a in answer]

        def nan_on_seven(prompts, completions, completion_ids, answer, **kwargs):
            return [math.nan if a == "7" else 1.0 - len(ids) / 8 for a, ids in zip(answer, completion_ids, strict=True)]

        register.add("crashes_on_seven", crashes)
        register.add("nan_on_seven", nan_on_seven)


def sevens(root: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": "What is 3 plus 4?"}], "answer": "7"}] * 4
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_a_reward_that_raises_is_reported_with_its_name_and_the_row(ft_tiny_model_dir, tmp_path):
    from ft.run import run

    config = grpo_config(tmp_path, ft_tiny_model_dir, grpo={"rewards": [{"name": "crashes_on_seven"}]})
    sevens(tmp_path)
    with registered_plugin(FailingReward, "failing_reward"), pytest.raises(FtError) as info:
        run(config)
    text = str(info.value)
    assert "reward 'crashes_on_seven' (plugin 'failing_reward') raised ZeroDivisionError: float division by zero" in text
    assert 'on this row: {"prompt": [{"role": "user", "content": "What is 3 plus 4?"}], "completion": ' in text
    assert '"answer": "7"' in text


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_reward_follows_the_health_policy(policy, ft_tiny_model_dir, tmp_path, caplog):
    from safetensors.torch import load_file

    from ft.run import run

    config = grpo_config(tmp_path, ft_tiny_model_dir, max_steps=2, health={"on_nonfinite": policy, "watch": False},
                         grpo={"rewards": [{"name": "nan_on_seven"}]})
    sevens(tmp_path)
    with registered_plugin(FailingReward, "failing_reward"):
        if policy == "stop":
            with pytest.raises(FtError) as info:
                run(config)
            assert "training stopped at step 1: the loss is NaN" in str(info.value)
        else:
            result = run(config)
            assert result.metrics["warnings"][0]["check"] == "nonfinite"
            before = load_file(ft_tiny_model_dir / "model.safetensors")
            after = load_file(tmp_path / "out" / "model.safetensors")
            assert all((before[k] == after[k]).all() for k in before)  # both steps were skipped
    assert "reward 'nan_on_seven' returned nan for 8 completion(s)" in caplog.text
    assert "health.on_nonfinite decides" in caplog.text


class PartlyNone:
    """A reward for even answers only, and one that never applies."""

    @hookimpl
    def ft_register_rewards(register):
        def even_only(prompts, completions, completion_ids, answer, **kwargs):
            return [-len(ids) / 8 if int(a) % 2 == 0 else None for a, ids in zip(answer, completion_ids, strict=True)]

        def never(prompts, completions, completion_ids, **kwargs):
            return [None] * len(completions)

        register.add("even_only", even_only)
        register.add("never", never)


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_rewards_that_apply_to_some_completions_train_and_say_what_they_left_out(ft_tiny_model_dir, tmp_path, caplog):
    """None is "does not apply" (TRL): the run trains on what is scored, and says once what was not."""
    from ft.run import run

    config = grpo_config(tmp_path, ft_tiny_model_dir, max_steps=2, grpo={"rewards": [{"name": "even_only"},
                                                                                  {"name": "never"}]})
    with registered_plugin(PartlyNone, "partly_none"):
        result = run(config)
    assert result.metrics["steps"] == 2
    assert caplog.text.count("reward 'never' (plugin 'partly_none', function ") == 1
    assert "returned None for every completion of step 1 (it applies to none of them" in caplog.text
    assert caplog.text.count("every reward returned None for ") == 1
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["loss"]) for r in history)


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_a_reward_model_scores_completions(ft_tiny_model_dir, tmp_path):
    """Any sequence-classification checkpoint: here a tiny random Llama classifier made on the spot."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from ft.run import run

    rm_dir = tmp_path / "rm"
    tok = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                    num_labels=1, pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>")))
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    config = grpo_config(tmp_path, ft_tiny_model_dir, max_steps=2,
                         grpo={"rewards": [{"name": "reward_model", "model": str(rm_dir), "batch_size": 3}]})
    result = run(config)
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    scores = [r["reward/reward_model/mean"] for r in history]
    assert all(math.isfinite(s) and s != 0.0 for s in scores)
    assert all(r["reward/reward_model/std"] > 0 for r in history)  # completions score differently
    assert result.metrics["steps"] == 2
    # the reward is the classifier's score of prompt + completion in its chat template
    line = json.loads((tmp_path / "out" / "completions.jsonl").read_text().splitlines()[0])
    text = tok.apply_chat_template([*line["prompt"], {"role": "assistant", "content": line["completion"]}], tokenize=False)
    with torch.no_grad():
        expected = float(rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
    assert line["rewards"]["reward_model"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
@pytest.mark.parametrize("plugins", [["lora"], ["lora", "qlora"]])
def test_lora_and_qlora_train_an_adapter_against_the_adapter_disabled_base(plugins, ft_tiny_model_dir, tmp_path, caplog):
    import logging

    from ft.run import run

    if "qlora" in plugins:
        pytest.importorskip("bitsandbytes")
    caplog.set_level(logging.INFO)
    config = grpo_config(tmp_path, ft_tiny_model_dir, plugins=plugins, max_steps=3, learning_rate=5e-3, bf16=False,
                         lora={"r": 4, "alpha": 8, "target_modules": "all-linear"}, grpo={"beta": 0.1})
    result = run(config)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert "grpo: reference model = the base model with the adapter disabled (no second copy in memory)" in caplog.text
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6) and history[-1]["kl"] > 0
    assert result.metrics["steps"] == 3


THIRD_PARTY = '''
    """A third-party reward, installed from its own distribution."""
    from ft import hookimpl


    def says_the_answer(prompts, completions, completion_ids, answer, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [1.0 if a in t else 0.0 for t, a in zip(texts, answer)]


    @hookimpl
    def ft_register_rewards(register):
        register.add("says_the_answer", says_the_answer)
'''


@pytest.mark.slow
def test_a_pip_installed_reward_works(ft_tiny_model_dir, tmp_path):
    env = {**install_distribution(tmp_path / "site", "ft-answer-reward", "0.2.0", {"ft_answer_reward": THIRD_PARTY},
                                  {"answer_reward": "ft_answer_reward"}),
           "FT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    config = grpo_config(tmp_path, ft_tiny_model_dir, max_steps=2, grpo={"rewards": [{"name": "says_the_answer"}]})
    listed = subprocess.run([sys.executable, "-m", "ft.cli", "plugins"], env=env, capture_output=True, text=True)
    assert "answer_reward" in listed.stdout and "ft-answer-reward 0.2.0" in listed.stdout
    assert "ft_register_rewards" in listed.stdout
    proc = subprocess.run([sys.executable, "-m", "ft.cli", "run", str(config)], env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert all("reward/says_the_answer/mean" in r for r in history)


# -- kill -9 and resume ---------------------------------------------------------------------------------

KILLED_AT = 3
PAUSE_AT_STEP = textwrap.dedent('''
    """ft run that writes a marker and waits (to be killed) when optimizer step N has ended."""
    import sys
    import time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from ft import hookimpl
    from ft.kernel.plugins import add_process_plugin

    config, marker, step = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])


    class Pause:
        @hookimpl
        def ft_callbacks(cfg):
            from transformers import TrainerCallback

            class AtStepEnd(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    if state.global_step == step:
                        marker.write_text("paused")
                        time.sleep(600)

            return [AtStepEnd()]


    add_process_plugin("pause", Pause)
    sys.argv = ["ft", "run", config]
    from ft.cli import main

    main()
''')


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_kill_9_then_resume_reproduces_the_uninterrupted_run(ft_tiny_model_dir, tmp_path):
    """Killed with SIGKILL after step 3 (checkpoint-2 is the last one): `ft run` resumes from it and steps 3-6
    generate the same completions and give the same rewards and losses as a run that was never killed.
    num_iterations 2: each batch of completions trains two steps, and checkpoints fall between batches."""
    import signal
    import time

    from ft.run import run

    settings = dict(max_steps=6, save_steps=2, grpo={"num_iterations": 2, "beta": 0.05, "log_completions_steps": 1})
    ref_root, root = tmp_path / "reference", tmp_path / "killed"
    ref_root.mkdir()
    root.mkdir()
    reference = run(grpo_config(ref_root, ft_tiny_model_dir, **settings))
    config = grpo_config(root, ft_tiny_model_dir, **settings)

    script, marker = root / "pausing_run.py", root / "paused"
    script.write_text(PAUSE_AT_STEP)
    proc = subprocess.Popen([sys.executable, str(script), str(config), str(marker), str(KILLED_AT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "FT_NO_PROGRESS": "1"})
    try:
        deadline = time.monotonic() + 600  # a hang guard, not a speed requirement
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the step"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    out = root / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    logged = [json.loads(x)["step"] for x in (out / "completions.jsonl").read_text().splitlines()]
    assert max(logged) == KILLED_AT  # the killed run had logged step 3's completions already

    resumed = run(config)
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-2")
    want = {r["step"]: r for r in json.loads((ref_root / "out" / "metrics.json").read_text())["history"]}
    got = {r["step"]: r for r in json.loads((out / "metrics.json").read_text())["history"]}
    assert sorted(got) == list(range(1, 7))
    for step in range(3, 7):
        for key in ("loss", "grad_norm", "kl", "entropy"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-7), (step, key)
    for step in (3, 5):  # generation steps: the same completions, so the same rewards
        for key in ("reward", "completion_length"):
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-6), (step, key)
    assert "reward" not in got[4]  # the second iteration on step 3's completions generates nothing
    lines = (out / "completions.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines]
    assert steps == sorted(steps) and steps.count(3) == steps.count(1), "step 3 is logged once, after the resume"
    assert lines == (ref_root / "out" / "completions.jsonl").read_text().splitlines()
    assert resumed.metrics["steps"] == reference.metrics["steps"] == 6


# -- a slow reward: its time limit, and Ctrl-C inside it ---------------------------------------------------

SLEEPY_REWARD = textwrap.dedent('''
    """A reward that scores step 1, then hangs in step 2 (after writing a marker)."""
    import os
    import time
    from pathlib import Path

    from ft import hookimpl

    calls = []


    def sleepy(prompts, completions, completion_ids, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            Path(os.environ["FT_SLEEPY_MARKER"]).write_text("sleeping")
            time.sleep(600)
        return [-len(ids) / 8 for ids in completion_ids]


    @hookimpl
    def ft_register_rewards(register):
        register.add("sleepy", sleepy)
''')


@pytest.mark.slow
def test_ctrl_c_in_a_slow_reward_stops_within_seconds_and_keeps_the_last_checkpoint(ft_tiny_model_dir, tmp_path):
    """The first SIGINT used to wait for the step to end, forever with a reward that hangs. Now the step is
    abandoned a few seconds later: exit 130, a message saying what was kept, and nothing half-written."""
    import signal

    plugin, marker = tmp_path / "sleepy.py", tmp_path / "sleeping"
    plugin.write_text(SLEEPY_REWARD)
    config = grpo_config(tmp_path, ft_tiny_model_dir, max_steps=3, save_steps=1, gradient_accumulation_steps=1,
                         plugin_paths=[str(plugin)], grpo={"rewards": [{"name": "sleepy"}]})
    env = {**os.environ, "FT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "FT_SLEEPY_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "ft.cli", "run", str(config)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not marker.exists():  # a hang guard follows; no speed is asserted
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=120)[1]  # before: still waiting for the step to end
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    out = tmp_path / "out"
    assert "stopped by SIGINT during step 2 of 3, while waiting for reward 'sleepy': the step did not end within" in stderr
    assert f"the newest complete checkpoint, {out / 'checkpoint-1'} (step 1), is where a resumed run starts" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert not any((out / name).exists() for name in ("model.safetensors", "metrics.json")), "no final outputs"
    assert not [p for p in out.rglob("*") if "tmp" in p.name.lower() or p.name.endswith((".partial", ".incomplete"))]
    logged = [json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()]
    assert set(logged) == {1}  # the abandoned step logged nothing


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_reward_timeout_of_the_config_applies_to_each_call(ft_tiny_model_dir, tmp_path, monkeypatch):
    from ft.run import run

    plugin, marker = tmp_path / "sleepy.py", tmp_path / "sleeping"
    plugin.write_text(SLEEPY_REWARD)
    monkeypatch.setenv("FT_SLEEPY_MARKER", str(marker))
    config = grpo_config(tmp_path, ft_tiny_model_dir, max_steps=2, gradient_accumulation_steps=1,
                         plugin_paths=[str(plugin)], grpo={"reward_timeout": 1, "rewards": [{"name": "sleepy"}]})
    with pytest.raises(FtError) as info:
        run(config)
    text = str(info.value)
    assert f"reward 'sleepy' (plugin 'sleepy', function sleepy at {plugin}:" in text
    assert f"did not return within grpo.reward_timeout (1 s) for 4 completions; it was running {plugin}:" in text


# -- two processes over gloo ------------------------------------------------------------------------------

PROBE_REWARD = '''
    """A reward that records, per rank, which prompts it scored (and how many completions of each)."""
    import json
    import os

    from ft import hookimpl


    def probe(prompts, completions, completion_ids, answer, **kwargs):
        path = os.path.join(os.environ["FT_PROBE_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl")
        with open(path, "a") as fh:
            fh.write(json.dumps({"prompts": [p[0]["content"] for p in prompts]}) + "\\n")
        return [1.0 if a in (c[0]["content"]) else -len(ids) / 8 for c, a, ids in zip(completions, answer, completion_ids)]


    @hookimpl
    def ft_register_rewards(register):
        register.add("probe", probe)
'''


@pytest.mark.slow
def test_ddp_two_processes_each_generate_for_their_own_prompts(ft_tiny_model_dir, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    env = {**install_distribution(tmp_path / "site", "ft-probe-reward", "0.1", {"ft_probe_reward": PROBE_REWARD},
                                  {"probe_reward": "ft_probe_reward"}),
           "FT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "FT_PROBE_DIR": str(probe)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    # 16 distinct prompts; per step each rank takes 2 prompts x 4 completions (micro-batches of 4, accumulation 2)
    config = grpo_config(tmp_path, ft_tiny_model_dir, max_steps=3, grpo={"rewards": [{"name": "probe"}],
                                                                    "scale_rewards": "batch", "beta": 0.05})
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}], "answer": str(2 * i)} for i in range(16)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "ft.cli", "run", str(config), "--nproc", "2"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]

    calls = {r: [json.loads(x)["prompts"] for x in (probe / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert [len(c) for c in calls.values()] == [3, 3], "each rank scores its own completions, once per step"
    for step in range(3):
        mine = [calls[r][step] for r in (0, 1)]
        for scored in mine:  # 2 prompts x 4 completions, grouped
            assert len(scored) == 8 and len(set(scored[:4])) == 1 and len(set(scored[4:])) == 1
        assert not set(mine[0]) & set(mine[1]), "the two ranks generate for different prompts"
    seen = [p for r in (0, 1) for step in calls[r] for p in set(step)]
    assert len(seen) == len(set(seen)) == 12, "no prompt is used twice within the epoch"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["summary"]["steps"] == 3 and all("reward/probe/mean" in r for r in metrics["history"])
    assert proc.stdout.count("training finished") == 1


@pytest.mark.slow
@pytest.mark.usefixtures("ft_one_torch_thread")
def test_the_example_learns_to_answer_with_a_number_and_stop(tmp_path):
    """examples/grpo.yaml: the tiny random model's mean reward climbs from below 0 to about 1."""
    from ft.run import run

    example = Path(__file__).resolve().parents[2] / "examples" / "grpo.yaml"
    result = run(example, overrides=[f"output_dir={tmp_path / 'out'}", f"dataset_prepared_path={tmp_path / 'prep'}"])
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert history[0]["reward"] < 0 and history[0]["completion_length"] == 16
    assert history[-1]["reward"] > 0.9 and history[-1]["completion_length"] < 4
    assert result.metrics["warnings"] == []
    last = [json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()][-16:]
    assert sum(x["completion"].strip().isdigit() for x in last) >= 12


# -- the colocated sampling loop ----------------------------------------------------------------------------


def test_sampling_filters_equal_hugging_face_warpers():
    import torch
    from ft_plugins.grpo import filter_logits
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.6, 10, 0.9)]:
        want = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1:
            want = TopPLogitsWarper(top_p)(None, want)
        assert torch.equal(filter_logits(logits, temperature, top_k, top_p), want)


def test_the_exponential_race_samples_the_softmax_distribution():
    import torch

    torch.manual_seed(0)
    probs = torch.softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]), -1).expand(40000, 5)
    chosen = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
    frequencies = torch.bincount(chosen, minlength=5).float() / len(chosen)
    assert torch.allclose(frequencies, probs[0], atol=0.01)


@pytest.mark.usefixtures("ft_one_torch_thread")
def test_the_sampling_loop_continues_like_generate_and_drops_finished_rows(ft_tiny_model_dir):
    """Greedy (top_k 1) the loop must give exactly what model.generate gives, for left-padded prompts of
    different lengths, each prompt's cache shared by its n rows, and rows leaving the batch at their end token."""
    import torch
    from ft_plugins.grpo import cut_at_eos, left_pad, sample_groups
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir).eval()
    prompts = [[5, 17, 99, 3, 250, 12], [44, 8], [300, 301, 302, 7]]
    ids, mask = left_pad(prompts, 0, "cpu")
    with torch.inference_mode():
        greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                pad_token_id=0)[:, ids.shape[1]:].tolist()
        stop = frozenset({greedy[0][3], greedy[2][6]})  # rows 0 and 2 end early
        got = sample_groups(model, ids, mask, 2, {"temperature": 1.0, "top_k": 1, "top_p": 1.0, "max_tokens": 12},
                            stop)
    want = cut_at_eos(greedy, stop)
    assert got == [want[0], want[0], want[1], want[1], want[2], want[2]]
    assert len(want[0]) < 12 and len(want[2]) < 12 and len(want[1]) == 12


@pytest.mark.usefixtures("ft_one_torch_thread")
def test_a_model_the_loop_does_not_fit_falls_back_to_generate(ft_tiny_model_dir, monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    import ft_plugins.grpo as grpo
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir).train()
    trainer = SimpleNamespace(model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m), pad_token_id=0,
                              args=SimpleNamespace(device=torch.device("cpu")), eos_token_ids=frozenset({2}),
                              _logits_to_keep=True)

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no cache for this architecture")

    monkeypatch.setattr(grpo, "sample_groups", unsupported)
    caplog.set_level(logging.INFO)
    generation = grpo.HFGeneration(trainer)
    got = generation.generate([[5, 6, 7], [8, 9]], 3, {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_tokens": 4})
    assert len(got) == 6 and all(1 <= len(c) <= 4 for c in got)
    assert "sampling with model.generate (the sampling loop does not fit this model: NotImplementedError" in caplog.text
    assert generation.use_generate and model.training  # said once; the training mode is restored


@pytest.mark.usefixtures("ft_one_torch_thread")
def test_a_stop_request_abandons_generation_between_tokens_without_falling_back(ft_tiny_model_dir):
    """Ctrl-C during a long generation: the loop asks before each token; the stop is not taken for a model
    the loop does not fit (no fallback to generate, which could not be stopped)."""
    from types import SimpleNamespace

    import ft_plugins.grpo as grpo
    import torch
    from transformers import AutoModelForCausalLM

    asked = []

    def check_stop(doing):
        asked.append(doing)
        if len(asked) == 3:
            raise FtError("step abandoned")

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir)
    trainer = SimpleNamespace(model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m), pad_token_id=0,
                              args=SimpleNamespace(device=torch.device("cpu")), eos_token_ids=frozenset({2}),
                              _logits_to_keep=True, ft_check_stop=check_stop)
    generation = grpo.HFGeneration(trainer)
    with pytest.raises(FtError, match="step abandoned"):
        generation.generate([[5, 6, 7]], 2, {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_tokens": 50})
    assert asked == ["generating completions"] * 3 and not generation.use_generate


@pytest.mark.usefixtures("ft_one_torch_thread")
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_the_sampling_loop_draws_the_tokens_generate_draws(ft_tiny_model_dir, temperature, top_k, top_p):
    """torch.multinomial draws one sample by the same exponential race, so with the same seed (and no row
    ending early: generate keeps sampling for finished rows) the loop samples exactly generate's tokens."""
    import torch
    from ft_plugins.grpo import left_pad, sample_groups
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir).eval()
    ids, mask = left_pad([[5, 17, 99, 3, 250, 12], [44, 8], [300, 301, 302, 7]], 0, "cpu")
    with torch.inference_mode():
        torch.manual_seed(11)
        want = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=top_k,
                              top_p=top_p, max_new_tokens=10, num_return_sequences=4, pad_token_id=0,
                              eos_token_id=[511])[:, ids.shape[1]:].tolist()
        torch.manual_seed(11)
        got = sample_groups(model, ids, mask, 4, {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                                  "max_tokens": 10}, frozenset({511}))
    assert got == want
