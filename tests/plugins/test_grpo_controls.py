"""GRPO generation controls and prompt options: stop strings and token ids, min_p, repetition_penalty,
mask_truncated_completions, system_prompt / apply_chat_template / chat_template_kwargs for prompts, and
``ft preprocess --debug`` on a prompt dataset."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from test_grpo import grpo_config, load_context, write_prompts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ft_one_torch_thread")]


def prepared(config):
    from ft.run import preprocess

    return preprocess(load_context(config))


def with_entry(config, **entry):
    raw = yaml.safe_load(config.read_text())
    raw["datasets"][0].update(entry)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def test_string_prompts_get_the_system_prompt_and_chat_template_when_asked(ft_tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    config = grpo_config(tmp_path, ft_tiny_model_dir)
    write_prompts(tmp_path / "prompts.jsonl", n=4, chat=False)
    with_entry(config, system_prompt="Answer with a number.", apply_chat_template=True,
               chat_template_kwargs={"unused_variable": True})
    data, _ = prepared(config)
    ref = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    rows = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    got = {tuple(r["input_ids"]): r for r in data.train}
    for row in rows:
        messages = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": row["prompt"]}]
        ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert json.loads(got[tuple(ids)]["prompt"]) == messages, "the rewards see the messages the model saw"


def test_chat_prompts_get_the_system_prompt_only_where_they_have_none(ft_tiny_model_dir, tmp_path):
    config = grpo_config(tmp_path, ft_tiny_model_dir)
    rows = [{"prompt": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi."}]},
            {"prompt": [{"role": "user", "content": "Hello."}]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_entry(config, system_prompt="Default.")
    data, tok = prepared(config)
    prompts = sorted(json.loads(r["prompt"])[0]["content"] for r in data.train)
    assert prompts == ["Default.", "Own."]
    assert all("Default." in tok.decode(r["input_ids"]) or "Own." in tok.decode(r["input_ids"]) for r in data.train)


def test_preprocess_debug_shows_prompt_rows(ft_tiny_model_dir, tmp_path):
    from ft.tools.debug import show_samples

    config = grpo_config(tmp_path, ft_tiny_model_dir)
    data, tok = prepared(config)
    buf = io.StringIO()
    show_samples(data.train, tok, 2, stream=buf, colour=False)  # was KeyError: 'labels'
    text = buf.getvalue()
    assert text.count("--- prompt ") == 2 and "the completions are generated and trained" in text
    assert "<|im_start|>assistant" in text and text.count("[+") == 1, "nothing of a prompt is trained (legend only)"
    assert "answer: " in text, "the columns the rewards get are shown"


def run_grpo(tmp_path, ft_tiny_model_dir, **grpo):
    from ft.run import run

    config = grpo_config(tmp_path, ft_tiny_model_dir, grpo={"log_completions_steps": 1, **grpo}, max_steps=2)
    run(config)
    lines = [json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    return lines, history


def test_stop_token_ids_end_completions_and_truncated_ones_can_be_masked(ft_tiny_model_dir, ft_tiny_tokenizer, tmp_path):
    # every token id below 300 stops: completions are short, and end in one of them or run to the limit
    stops = list(range(300))
    lines, history = run_grpo(tmp_path, ft_tiny_model_dir, stop_token_ids=stops, mask_truncated_completions=True,
                              max_completion_len=6)
    assert lines
    for r in history:
        assert 0 <= r["completion_truncated"] <= 1
    assert any(r["completion_length"] < 6 for r in history)


def test_mask_truncated_completions_leaves_them_out_of_the_loss(ft_tiny_model_dir, tmp_path):
    import torch
    from ft_plugins.grpo import GRPOOptions, trainer_class
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    tok.pad_token = "<|reserved_0|>"
    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to="none")
    trainer = trainer_class()(model=model, args=args, processing_class=tok, rewards=[],
                              grpo=GRPOOptions(num_generations=2, max_completion_len=3,
                                               mask_truncated_completions=True))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    completions = [[5, 6, 7], [5, eos], [8, 9, 10], [11, eos]]
    (batch,) = trainer._micro_batches([[1, 2], [3, 4]], completions, torch.ones(4), None,
                                      [True, False, True, False])
    assert batch["completion_mask"].tolist() == [[0, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 0]]
    assert float(batch["step_tokens"]) == 4.0, "dapo counts only the tokens that are trained"


def test_sampling_controls_reach_the_generator(ft_tiny_model_dir, tmp_path):
    """min_p, repetition_penalty and stop strings go to Hugging Face generate (the sampling loop has none of
    them), and the same keys to vLLM's SamplingParams."""
    from ft_plugins import grpo as grpo_plugin
    from ft_plugins.vllm import apply_sampling

    seen = []
    original = grpo_plugin.HFGeneration.generate

    def spy(self, prompt_ids, n, sampling):
        seen.append(dict(sampling))
        return original(self, prompt_ids, n, sampling)

    grpo_plugin.HFGeneration.generate = spy
    try:
        lines, _ = run_grpo(tmp_path, ft_tiny_model_dir, min_p=0.05, repetition_penalty=1.3, stop=["7"])
    finally:
        grpo_plugin.HFGeneration.generate = original
    assert seen and all(s["min_p"] == 0.05 and s["repetition_penalty"] == 1.3 and s["stop"] == ["7"] for s in seen)
    for line in lines:
        text = line["completion"] if isinstance(line["completion"], str) else line["completion"][0]["content"]
        assert "7" not in text[:-1], "nothing after the stop string"
    params = apply_sampling({**seen[0], "stop_token_ids": [3]})
    assert params["min_p"] == 0.05 and params["repetition_penalty"] == 1.3 and params["stop"] == ["7"]
    assert params["include_stop_str_in_output"] and params["stop_token_ids"] == [3] and params["logprobs"] == 0


def test_a_reward_function_by_import_path(ft_tiny_model_dir, tmp_path):
    from ft.run import run

    (tmp_path / "my_rewards.py").write_text(
        "import os\n"
        "with open(os.path.join(os.path.dirname(__file__), 'imports.log'), 'a') as f:\n"
        "    f.write('x')\n"
        "CALLS = []\n"
        "def short(prompts, completions, completion_ids, answer, **kwargs):\n"  # TRL's signature
        "    CALLS.append(len(completions))\n"
        "    return [-len(c) / 10 for c in completion_ids]\n")
    config = grpo_config(tmp_path, ft_tiny_model_dir, max_steps=1,
                         grpo={"rewards": [{"name": "my_rewards.py:short", "weight": 2.0}]})
    run(config)
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert "reward/my_rewards.py:short/mean" in history[0]
    assert history[0]["reward"] == pytest.approx(2.0 * history[0]["reward/my_rewards.py:short/mean"])
    assert (tmp_path / "imports.log").read_text() == "x"  # validation and the trainer share one import of the file


@pytest.mark.parametrize(("name", "says"), [
    ("nowhere_module_xyz:f", "could not import 'nowhere_module_xyz' (ModuleNotFoundError"),
    ("json:no_such_function", "'json' has no function 'no_such_function'"),
    ("missing.py:f", "could not import 'missing.py' (FileNotFoundError"),
])
def test_a_bad_import_path_is_a_config_error_with_its_line(name, says, tmp_path):
    from test_grpo import problems_of

    config = grpo_config(tmp_path, tmp_path, grpo={"rewards": [{"name": name}]})
    text = problems_of(config)
    assert "config.yaml:" in text and says in text
