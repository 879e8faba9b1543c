"""``ft infer`` and ``ft fsdp-consolidate`` on non-causal runs: a 3-step ``method: reward_model`` run scores
texts and a 3-step ``method: prm`` run scores steps, each equal to what transformers'
AutoModelFor{Sequence,Token}Classification gives for the same input (laid out by hand here); modes that
make no sense for a head are refused; consolidating a sharded checkpoint rebuilds the classifier head."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_prm import config_of as prm_config
from test_prm import step_rows
from test_reward_model import config_of as rm_config
from test_reward_model import separable_pairs

from ft.tools.testing import FtRunner

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ft_one_torch_thread")]

PROMPT = "What is 2 plus 3?"
SEPARATOR = " ;\n"  # not the default newline: infer must read the run's own separator


def _train(config: dict) -> Path:
    from ft.run import run

    result = run({**config, "max_steps": 3, "learning_rate": 3e-3, "logging_steps": 1, "seed": 0})
    assert result.metrics["steps"] == 3
    return Path(result.output_dir)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, ft_tiny_model_dir):
    root = tmp_path_factory.mktemp("rm")
    return _train(rm_config(root, ft_tiny_model_dir, separable_pairs(12, seed=1), micro_batch_size=4))


@pytest.fixture(scope="module")
def prm_run(tmp_path_factory, ft_tiny_model_dir):
    root = tmp_path_factory.mktemp("prm")
    return _train(prm_config(root, ft_tiny_model_dir, step_rows(12, seed=0), entry={"step_separator": SEPARATOR}))


def _lines(result) -> list[list[str]]:
    return [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]


def reference_scores(run_dir: Path, texts: list[str]) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    with torch.no_grad():
        return [float(model(**tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0]) for t in texts]


def test_infer_on_a_reward_model_scores_each_response(reward_run):
    from transformers import AutoTokenizer

    answers = ["The result is 5. Thanks!", "no cat red"]
    result = FtRunner().invoke("infer", reward_run, PROMPT, "--response", answers[0], "--response", answers[1])
    got = _lines(result.assert_ok())
    assert [line[1] for line in got] == answers
    tokenizer = AutoTokenizer.from_pretrained(reward_run)  # the conversation, rendered here by hand
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": a}],
                                           tokenize=False) for a in answers]
    expected = reference_scores(reward_run, texts)
    assert [float(line[0]) for line in got] == pytest.approx(expected, abs=1e-5)
    assert expected[0] != pytest.approx(expected[1], abs=1e-6)  # two different scores: not a constant

    raw = "a text scored exactly as it is given"
    got = _lines(FtRunner().invoke("infer", reward_run, raw).assert_ok())
    assert len(got) == 1 and float(got[0][0]) == pytest.approx(reference_scores(reward_run, [raw])[0], abs=1e-5)


def test_infer_on_a_process_reward_model_scores_each_step(prm_run):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    steps = ["the cat is blue", "the dog is red", "the fish is blue"]
    args = [a for s in steps for a in ("--step", s)]
    got = _lines(FtRunner().invoke("infer", prm_run, "Question 7:", *args).assert_ok())
    assert [line[0] for line in got] == ["step 1", "step 2", "step 3"] and [line[3] for line in got] == steps

    tokenizer = AutoTokenizer.from_pretrained(prm_run)  # the training layout, by hand: bos prompt (step sep)...

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []  # the tiny tokenizer has none
    layout, ends = [*bos, *ids("Question 7:")], []
    for step in steps:
        layout += ids(step) + ids(SEPARATOR)
        ends.append(len(layout) - 1)
    model = AutoModelForTokenClassification.from_pretrained(prm_run, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([layout])).logits[0, ends]
    expected = logits.softmax(-1)[:, 1].tolist()
    assert [float(line[1]) for line in got] == pytest.approx(expected, abs=1e-5)
    assert [line[2] for line in got] == ["good" if x else "bad" for x in logits.argmax(-1).tolist()]

    # another separator gives other scores: the run's own separator was the one used
    other = _lines(FtRunner().invoke("infer", prm_run, "Question 7:", *args, "--step-separator", "\n").assert_ok())
    assert [float(line[1]) for line in other] != pytest.approx(expected, abs=1e-5)


def test_modes_that_make_no_sense_for_a_head_are_refused(reward_run, prm_run, ft_tiny_model_dir):
    runner = FtRunner()
    runner.invoke("infer", reward_run).assert_error("holds a reward model", "it does not chat", "--response")
    runner.invoke("infer", reward_run, PROMPT, "--temperature", "0.5").assert_error(
        "--temperature: not an option for a reward model", "which scores, it does not generate")
    runner.invoke("infer", reward_run, PROMPT, "--step", "x").assert_error("--step: not an option for a reward model")
    runner.invoke("infer", prm_run, PROMPT).assert_error("process reward model", "give the steps", "--step STEP1")
    runner.invoke("infer", prm_run, PROMPT, "--response", "x").assert_error(
        "--response: not an option for a process reward model")
    runner.invoke("infer", ft_tiny_model_dir, PROMPT, "--response", "x").assert_error(
        "--response: not an option for a causal language model", "which generates, it does not score")
    from ft_plugins.infer import generate_once

    from ft.api import FtError

    with pytest.raises(FtError, match="it scores texts, it does not generate"):
        generate_once(reward_run, PROMPT)


def _shard(run_dir: Path, to: Path) -> Path:
    """``to``: the run's model as an fsdp run with ``save: sharded`` leaves it (a torch.distributed checkpoint
    and the config, no model.safetensors), written by one process."""
    import torch
    import torch.distributed.checkpoint as dcp
    import transformers
    from ft_plugins.fsdp import SHARDED_DIR
    from transformers import AutoConfig

    shutil.copytree(run_dir, to)
    (to / "model.safetensors").unlink()
    config = AutoConfig.from_pretrained(to)
    model = getattr(transformers, config.architectures[0]).from_pretrained(run_dir, dtype=torch.float32)
    dcp.save(model.state_dict(), checkpoint_id=str(to / SHARDED_DIR))
    return to


@pytest.mark.parametrize("which", ["reward_model", "prm"])
def test_fsdp_consolidate_rebuilds_the_classifier_head(which, reward_run, prm_run, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    run_dir = reward_run if which == "reward_model" else prm_run
    sharded = _shard(run_dir, tmp_path / "sharded")
    FtRunner().invoke("fsdp-consolidate", sharded).assert_ok()
    auto = AutoModelForSequenceClassification if which == "reward_model" else AutoModelForTokenClassification
    rebuilt = auto.from_pretrained(sharded, dtype=torch.float32)
    assert type(rebuilt).__name__ == ("LlamaForSequenceClassification" if which == "reward_model"
                                      else "LlamaForTokenClassification")
    original, written = load_file(str(run_dir / "model.safetensors")), load_file(str(sharded / "model.safetensors"))
    assert set(written) == set(original) and any(k.startswith(("score.", "classifier.")) for k in written)
    for key, value in original.items():
        torch.testing.assert_close(written[key].float(), value.float(), rtol=0, atol=0)


def test_infer_on_a_lora_reward_model_scores_as_its_merged_classifier(tmp_path, ft_tiny_model_dir):
    """A LoRA run saves an adapter: infer builds the base as a classifier with the adapter (lora's
    ft_load_trained); its scores equal transformers' on the merged classifier."""
    from ft_plugins.lora import merge_adapter
    from transformers import AutoTokenizer

    out = _train(rm_config(tmp_path, ft_tiny_model_dir, separable_pairs(12, seed=1), micro_batch_size=4,
                           plugins=["lora"], lora={"r": 8, "alpha": 16}))
    assert (out / "adapter_config.json").is_file()
    answers = ["The result is 5. Thanks!", "no dog blue"]
    got = _lines(FtRunner().invoke("infer", out, PROMPT, "--response", answers[0], "--response", answers[1]).assert_ok())
    merged = Path(merge_adapter(out, tmp_path / "merged"))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": a}],
                                           tokenize=False) for a in answers]
    assert [float(line[0]) for line in got] == pytest.approx(reference_scores(merged, texts), abs=1e-4)
