"""The SmolLM2 demos (examples/smollm2/): their data is what make_data.py writes, the held-out reward pairs
share nothing with the training pairs, and every config runs end to end -- here on the tiny model, two steps
each, chained as the README chains them (reward model -> merge -> GRPO with it). The figures of the real runs
are in examples/smollm2/README.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "examples" / "smollm2"

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_shipped_data_is_what_make_data_writes(tmp_path):
    subprocess.run([sys.executable, str(HERE / "make_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    shipped = sorted(p.name for p in (HERE / "data").iterdir())
    assert shipped == sorted(p.name for p in tmp_path.iterdir())
    for name in shipped:
        assert (HERE / "data" / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_held_out_pairs_share_no_product_and_no_sentence_with_the_training_pairs():
    def texts(rows, side):
        return {r[side][0]["content"] for r in rows}

    train, held = _rows(HERE / "data" / "review_pairs.jsonl"), _rows(HERE / "data" / "review_pairs_heldout.jsonl")
    for side in ("prompt", "chosen", "rejected"):
        assert not texts(train, side) & texts(held, side), side
    sys.path.insert(0, str(HERE))
    try:
        import make_data
    finally:
        sys.path.remove(str(HERE))
    assert not set(make_data.TRAIN_PRODUCTS) & set(make_data.HELDOUT_PRODUCTS)
    assert not set(make_data.PROMPT_PRODUCTS) & (set(make_data.TRAIN_PRODUCTS) | set(make_data.HELDOUT_PRODUCTS))
    sums = _rows(HERE / "data" / "sums.jsonl")
    assert len(sums) == 81 and all(r["answer"] == str(eval(r["prompt"][0]["content"][8:-1])) for r in sums)


def test_every_config_points_at_the_schema():
    for config in sorted(HERE.glob("*.yaml")):
        assert config.read_text().splitlines()[0] == "# yaml-language-server: $schema=../../schemas/ft.schema.json"


def test_the_demos_run_end_to_end_on_the_tiny_model(tmp_path, monkeypatch, ft_runner, ft_tiny_model_dir):
    monkeypatch.chdir(tmp_path)  # the configs write out/ and prepared/ under the working directory
    tiny = ("--set", f"base_model={ft_tiny_model_dir}", "--set", "max_steps=2", "--set", "eval_steps=2")
    rm = ft_runner.run(HERE / "reward_model.yaml", *tiny).assert_ok()
    history = json.loads((tmp_path / "out" / "smollm2-rm" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history if "eval_accuracy" in h] == [2]  # measured on the held-out pairs
    ft_runner.invoke("merge", tmp_path / "out" / "smollm2-rm").assert_ok()
    assert (tmp_path / "out" / "smollm2-rm" / "merged" / "config.json").exists()
    ft_runner.run(HERE / "grpo_reward_model.yaml", *tiny).assert_ok()
    history = json.loads((tmp_path / "out" / "smollm2-grpo-rm" / "metrics.json").read_text())["history"]
    assert any("reward/reward_model/mean" in h for h in history), history[0]
    ft_runner.run(HERE / "ebft.yaml", *tiny).assert_ok()
    # vLLM's CPU engine refuses the tiny model's head size (16): the same config, sampled by ft's own loop
    ft_runner.run(HERE / "grpo_sums.yaml", *tiny, "-p", "no:vllm").assert_ok()
    history = json.loads((tmp_path / "out" / "smollm2-grpo-sums" / "metrics.json").read_text())["history"]
    assert any("reward/rewards.py:says_the_sum/mean" in h for h in history), sorted(history[0])
    assert rm.ok


def test_the_sums_reward_pays_for_the_stated_sum_only():
    sys.path.insert(0, str(HERE))
    try:
        from rewards import says_the_sum
    finally:
        sys.path.remove(str(HERE))
    completions = [[{"role": "assistant", "content": "6 + 5 = 11."}], [{"role": "assistant", "content": "It is 111."}],
                   [{"role": "assistant", "content": "Eleven"}], "11"]
    assert says_the_sum([None] * 4, completions, ["11"] * 4) == [1.0, 0.0, 0.0, 1.0]
