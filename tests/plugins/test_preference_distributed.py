"""DPO on 2 CPU processes over gloo (``ft run --nproc 2``): DDP, FSDP2 and DeepSpeed ZeRO-2.

With 2 micro-batches of 2 pairs per step, the 2 processes train on exactly the pairs one process
trains on with micro-batches of 4 (accelerate deals consecutive batches of one sampler out to the
processes), and every pair weighs the same in the loss: so the losses and rewards of the 2-process
run equal the 1-process run's step by step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preference-distributed")


@pytest.fixture(scope="module")
def env() -> dict:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", FT_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def pairs(work) -> Path:
    from test_preference import pair_rows, write_rows

    return Path(write_rows(work / "pairs.jsonl", pair_rows(32, seed=5)))


def write_config(work: Path, model_dir: Path, data: Path, name: str, **extra) -> Path:
    config = {
        "base_model": str(model_dir), "method": "dpo", "dpo": {"beta": 0.1},
        "datasets": [{"path": str(data), "type": "preference"}], "sequence_len": 64,
        "dataset_prepared_path": str(work / "prepared"), "output_dir": str(work / name),
        "micro_batch_size": 2, "max_steps": 5, "learning_rate": 5e-3, "lr_scheduler": "constant",
        "logging_steps": 1, "seed": 3, "dataset_num_proc": 1, **extra,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ft_run(env, work: Path, config: Path, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "ft.cli", "run", str(config), *args], env=env, cwd=work,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ft run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    out = Path(yaml.safe_load(config.read_text())["output_dir"])
    return [r for r in json.loads((out / "metrics.json").read_text())["history"] if "loss" in r]


def test_two_processes_train_like_one_with_the_same_global_batch(env, work, ft_tiny_model_dir, pairs):
    one = ft_run(env, work, write_config(work, ft_tiny_model_dir, pairs, "one", micro_batch_size=4))
    two = ft_run(env, work, write_config(work, ft_tiny_model_dir, pairs, "two"), "--nproc", "2")
    assert len(one) == len(two) == 5
    assert two[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key, a[key], b[key])
    assert two[-1]["loss"] < two[0]["loss"]


@pytest.mark.parametrize("plugins, section", [
    (["fsdp"], {}),
    (["fsdp", "lora"], {"lora": {"r": 4, "alpha": 8}}),
    (["deepspeed"], {"deepspeed": {"stage": 2}}),
], ids=["fsdp-full", "fsdp-lora", "deepspeed-zero2"])
def test_dpo_under_fsdp_and_deepspeed(env, work, ft_tiny_model_dir, pairs, plugins, section):
    name = "-".join(plugins)
    history = ft_run(env, work, write_config(work, ft_tiny_model_dir, pairs, name, plugins=plugins, **section),
                     "--nproc", "2")
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the initial policy
    assert all(math.isfinite(r["loss"]) for r in history) and history[-1]["loss"] < history[0]["loss"]
    out = work / name
    assert (out / ("adapter_model.safetensors" if "lora" in plugins else "model.safetensors")).is_file()
