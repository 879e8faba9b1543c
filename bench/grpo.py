"""GRPO throughput on CPU: `ft run` (method grpo) against TRL's GRPOTrainer, side by side.

    python bench/grpo.py                          # the tiny model of ft.tools.tiny, 3 repeats per side
    python bench/grpo.py --model /work/models/smollm2-135m-instruct --steps 6 --repeats 3
    python bench/grpo.py --out result.json

Both sides train the same model on the same chat prompts with colocated generation on the
training model (TRL: ``model.generate``; ft: its sampling loop, which draws the tokens
``model.generate`` draws and prefills each prompt once for its group), the same group size,
completions per step, completion length, sampling settings, reward (a length penalty), loss
(dapo, beta 0, one iteration), learning rate and number of optimizer steps, in fp32 on the CPU,
with ``--threads`` torch threads (default 1). Each run is its own subprocess, sides
alternate, and each side runs ``--repeats`` times: the machine may be shared, so medians are
reported with every run's figure.

Measured, between the Trainer's train begin and train end callbacks (generation, scoring, loss,
backward, optimizer; model loading and ft's data preparation are outside on both sides): prompts
per second of wall time, and prompts per CPU second of the process (with one torch thread, what
the wall time would be on an idle machine; a busy shared machine inflates wall times at random).
The mean completion length is printed too: a run whose completions were longer generated more
tokens. ``target`` checks issue 14's figure: ft at least 1.3x TRL in prompts per second.

Needs TRL (``pip install 'trl>=1.9,<2' requests``; in the dev extra).

vLLM sides (``--sides trl,ft,ft-vllm-colocate,ft-vllm-server``): ft with ``-p vllm`` on vLLM's CPU build, run
with the interpreter of ``$FT_VLLM_PYTHON`` (default ``.venv-vllm/bin/python``, made by ``.ci/vllm-env.sh``);
the server side starts ``ft vllm-serve`` itself before its run. Engine starts are outside the timed part, as
model loading is. ``--lora`` trains a LoRA adapter (r 16) on every ft side, so the vLLM sides sync only
the adapter; each vLLM side reports the mean bytes and seconds of a weight sync (``sync_bytes``,
``sync_seconds``) and ``--async`` turns on asynchronous generation (lag 1) on every vLLM side; the side
``ft-vllm-colocate-async`` is ``ft-vllm-colocate`` with it on, so one run compares the two. Their prompts per CPU second
count the training process only (vLLM's engine runs in processes of its own): compare wall time.
``issue_21_targets`` in the report checks issue 21's figures for the sides the run had.

``trl-vllm-colocate``: TRL's GRPOTrainer with ``use_vllm=True, vllm_mode="colocate"`` (its engine in the training
process, the model's dtype), in the same vLLM environment (TRL 1.16 installs there with ``--no-deps``, keeping
vLLM's transformers; .ci/vllm-env.sh does). One change to TRL: its colocate weight sync passes each parameter to
the vLLM model's ``load_weights``, which fails on vLLM 0.32's CPU build at the first sync (``'Parameter' object has
no attribute 'weight_loader'``: the weights were repacked for the CPU kernels after loading), so the bench sends
the same tensors through vLLM's in-place reload (``model_runner.reload_weights(weights_iterator=...)``) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TARGET = 1.3
RESULT = "bench-result: "  # a child's result line (vLLM prints on stdout too)
SIDES = ("trl", "ft", "ft-vllm-colocate", "ft-vllm-server", "trl-vllm-colocate", "ft-vllm-colocate-async")
VLLM_PYTHON = os.environ.get("FT_VLLM_PYTHON") or str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python")
QUESTIONS = ["What is {a} plus {b}?", "Add {a} and {b}.", "Please add {a} to {b}.", "Name a word with {a} letters."]


def prompts(n: int) -> list[list[dict[str, str]]]:
    import random

    rng = random.Random(0)
    return [[{"role": "user", "content": rng.choice(QUESTIONS).format(a=rng.randint(0, 9), b=rng.randint(0, 9))}]
            for _ in range(n)]


# -- one side, in its own process -----------------------------------------------------------------


def run_ft(args: argparse.Namespace, work: Path, vllm: str | None = None) -> dict[str, Any]:
    import yaml

    from ft.run import run

    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(args.prompts_per_step * args.steps)))
    config = {
        "base_model": args.model, "method": "grpo",
        "datasets": [{"path": str(data), "type": "prompt"}],
        "sequence_len": 256, "dataset_prepared_path": str(work / "prepared"), "dataset_num_proc": 1,
        "output_dir": str(work / "out"), "micro_batch_size": args.prompts_per_step * args.num_generations,
        "gradient_accumulation_steps": 1, "max_steps": args.steps, "learning_rate": 1e-6, "lr_scheduler": "constant",
        "logging_steps": 1, "seed": args.seed, "bf16": False, "shuffle": False,
        "grpo": {"num_generations": args.num_generations, "max_completion_len": args.max_completion_len,
                 "temperature": 1.0, "loss_type": "dapo", "beta": 0.0, "log_completions_steps": 0,
                 "rewards": [{"name": "length_penalty", "target": 8, "per_token": 0.05}]},
    }
    if args.lora:
        config["plugins"] = ["lora"]
        config["lora"] = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
        config["learning_rate"] = 1e-5
    port = None
    if vllm:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        config["plugins"] = [*config.get("plugins", []), "vllm"]
        config["vllm"] = {"mode": vllm, "port": port, "server_timeout": 900, "kv_cache_gb": 2,
                          "gpu_memory_utilization": 0.3,
                          "dtype": args.vllm_dtype, "max_model_len": 512, "engine_kwargs": {"enforce_eager": True}}
        config["grpo"]["async_generation"] = bool(args.async_gen)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    server = _start_server(path, port) if vllm == "server" else None
    try:
        return _timed_ft_run(path, work, run)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=120)


def _start_server(config: Path, port: int) -> Any:
    """``ft vllm-serve`` on the config, with this interpreter; returns once it answers (its start is not timed)."""
    import time
    import urllib.request

    server = subprocess.Popen([sys.executable, "-m", "ft.cli", "vllm-serve", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while True:
        if server.poll() is not None:
            raise SystemExit("ft vllm-serve exited before it answered")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise SystemExit("ft vllm-serve did not answer in 900 s") from None
            time.sleep(1)


def _timed_ft_run(path: Path, work: Path, run: Any) -> dict[str, Any]:
    from ft import hookimpl
    from ft.tools.testing import registered_plugin

    clock = Clock()

    class Timing:
        @hookimpl
        def ft_callbacks(cfg):
            return [clock.callback()]

    with registered_plugin(Timing, "bench_timing"):
        result = run(path)
    history = json.loads((work / "out" / "metrics.json").read_text())["history"]
    lengths = [r["completion_length"] for r in history if "completion_length" in r]
    out = {**clock.result(), "steps": result.metrics["steps"],
           "completion_length": statistics.mean(lengths) if lengths else None}
    for key, name in (("sync/bytes", "sync_bytes"), ("sync/seconds", "sync_seconds"), ("is/mean", "is_mean")):
        values = [r[key] for r in history if key in r]
        if values:
            out[name] = round(statistics.mean(values), 6)
    return out


class Clock:
    """Wall and CPU time of this process from the Trainer's train begin to its train end (both sides alike)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def callback(self) -> Any:
        import time

        from transformers import TrainerCallback

        clock = self

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.wall, clock.cpu = -time.perf_counter(), -time.process_time()

            def on_train_end(self, args, state, control, **kwargs):
                clock.wall += time.perf_counter()
                clock.cpu += time.process_time()

        return Timer()

    def result(self) -> dict[str, float]:
        return {"seconds": round(self.wall, 3), "cpu_seconds": round(self.cpu, 3)}


def run_trl(args: argparse.Namespace, work: Path, vllm: bool = False) -> dict[str, Any]:
    """TRL's GRPOTrainer; ``vllm``: generating with vLLM in the training process (``use_vllm``, colocate)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def length_penalty(completions, completion_ids, **kwargs):
        return [-0.05 * max(0, len(ids) - 8) for ids in completion_ids]

    config = GRPOConfig(
        output_dir=str(work / "out"), per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        gradient_accumulation_steps=1, num_generations=args.num_generations,
        max_completion_length=args.max_completion_len, temperature=1.0, loss_type="dapo", beta=0.0,
        max_steps=args.steps, learning_rate=1e-6, lr_scheduler_type="constant", logging_steps=1, seed=args.seed,
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, shuffle_dataset=False,
        **(trl_vllm_settings() if vllm else {}),
    )
    data = Dataset.from_list([{"prompt": p} for p in prompts(args.prompts_per_step * args.steps)])
    model = AutoModelForCausalLM.from_pretrained(args.model)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=length_penalty, args=config, train_dataset=data,
                          processing_class=tok, callbacks=[clock.callback()])
    trainer.train()
    history = trainer.state.log_history
    lengths = [r["completions/mean_length"] for r in history if "completions/mean_length" in r]
    out = {**clock.result(), "steps": trainer.state.global_step,
           "completion_length": statistics.mean(lengths) if lengths else None}
    ratios = [r["sampling/importance_sampling_ratio/mean"] for r in history
              if "sampling/importance_sampling_ratio/mean" in r]
    if ratios:  # vLLM: the trainer's over the engine's probabilities of the sampled tokens
        out["is_mean"] = round(statistics.mean(ratios), 6)
    return out


def trl_vllm_settings() -> dict[str, Any]:
    """GRPOConfig's vLLM colocate settings, as close to the ft vLLM sides' as TRL takes them (its engine's dtype is
    the model's, float32 here; its importance-sampling correction stays on, TRL's default, as ft's is)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(var, value)  # TRL's colocate engine uses vLLM's external_launcher: a process group of 1
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    _trl_sync_by_reload()
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
            "vllm_max_model_length": 512}


def _trl_sync_by_reload() -> None:
    """TRL 1.16's colocate weight sync hands vLLM's model one parameter at a time to ``model.load_weights``; vLLM
    0.32's CPU build repacked the weights for its kernels after loading, so that fails at the first sync
    (``AttributeError: 'Parameter' object has no attribute 'weight_loader'``, vllm/model_executor/layers/linear.py).
    The same tensors (TRL's own ``_iter_named_params``: gathered, adapter merged) go in the same process through
    vLLM's in-place reload instead (``model_runner.reload_weights(weights_iterator=...)``, which undoes and redoes
    that processing): the one change to TRL, only in colocate mode without sleep."""
    from trl.generation import vllm_generation

    original = vllm_generation.VLLMGeneration.sync_weights

    def sync_weights(self):
        if self.mode != "colocate" or self.enable_sleep_mode:
            return original(self)
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=self._iter_named_params())
        self.llm.reset_prefix_cache()
        return None

    vllm_generation.VLLMGeneration.sync_weights = sync_weights


# -- the driver -----------------------------------------------------------------------------------


def one(side: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
               "OMP_NUM_THREADS": str(args.threads)}
        python = VLLM_PYTHON if "vllm" in side else sys.executable
        command = [python, __file__, "--side", side, "--work", tmp, *_passthrough(args)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"{side} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT)), None)
        if line is None:
            raise SystemExit(f"{side} run printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        result = json.loads(line[len(RESULT):])
    prompts_done = result["steps"] * args.prompts_per_step
    result["prompts_per_second"] = round(prompts_done / result["seconds"], 3)
    result["prompts_per_cpu_second"] = round(prompts_done / result["cpu_seconds"], 3)
    return result


def targets(medians: dict[str, float], runs: dict[str, list[dict[str, Any]]], full: int, lora: bool) -> dict[str, Any]:
    """Issue 21's targets, for the sides this run had: vLLM >= 3x ft's own sampling and >= 1.3x the best TRL side
    (prompts per second), async >= 1.3x sync, and a LoRA sync moving <= 1/10 of the fp32 full weights."""
    out: dict[str, Any] = {}
    vllm = max((medians[s] for s in ("ft-vllm-colocate", "ft-vllm-server") if s in medians), default=None)
    trl = max((medians[s] for s in ("trl", "trl-vllm-colocate") if s in medians), default=None)
    if vllm and "ft" in medians:
        out["vllm_over_ft_hf"] = {"value": round(vllm / medians["ft"], 3), "wanted": 3.0, "met": vllm / medians["ft"] >= 3}
    if vllm and trl:
        out["vllm_over_best_trl"] = {"value": round(vllm / trl, 3), "wanted": 1.3, "met": vllm / trl >= 1.3}
    if {"ft-vllm-colocate-async", "ft-vllm-colocate"} <= set(medians):
        ratio = medians["ft-vllm-colocate-async"] / medians["ft-vllm-colocate"]
        out["async_over_sync"] = {"value": round(ratio, 3), "wanted": 1.3, "met": ratio >= 1.3}
    synced = [r["sync_bytes"] for rs in runs.values() for r in rs if r.get("sync_bytes")] if lora else []
    if synced:
        if full:
            share = statistics.median(synced) / full
            out["lora_sync_share_of_full"] = {"value": round(share, 4), "wanted": 0.1, "met": share <= 0.1}
    return out


def _passthrough(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
            "--num-generations", str(args.num_generations), "--max-completion-len", str(args.max_completion_len),
            "--seed", str(args.seed), "--threads", str(args.threads), "--vllm-dtype", args.vllm_dtype,
            *(["--lora"] if args.lora else []), *(["--async"] if args.async_gen else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: ft's tiny model, made on the fly)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: steadiest on a busy machine)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sides", default="trl,ft", help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--lora", action="store_true", help="ft sides train a LoRA adapter (vLLM: adapter-only sync)")
    parser.add_argument("--async", dest="async_gen", action="store_true", help="vLLM sides: async generation, lag 1")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="the vLLM engine's dtype")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # a child: one run, one JSON line
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        if args.side in ("trl", "trl-vllm-colocate"):
            result = run_trl(args, Path(args.work), vllm=args.side == "trl-vllm-colocate")
        else:
            if args.side == "ft-vllm-colocate-async":
                args.async_gen = True
            result = run_ft(args, Path(args.work), {"ft": None, "ft-vllm-colocate": "colocate",
                                                    "ft-vllm-colocate-async": "colocate",
                                                    "ft-vllm-server": "server"}[args.side])
        print(RESULT + json.dumps(result), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from ft.tools.tiny import make_tiny

            if any("vllm" in side for side in args.sides.split(",")):  # vLLM's CPU attention: head 32
                args.model = str(make_tiny(Path(tmp) / "tiny", heads=2, kv_heads=1))
                model_name = "ft.tools.tiny (2 layers, hidden 64, 2 heads of 32, vocab 512)"
            else:
                args.model = str(make_tiny(Path(tmp) / "tiny"))
                model_name = "ft.tools.tiny (2 layers, hidden 64, vocab 512)"
        else:
            model_name = args.model
        sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        unknown = [s for s in sides if s not in SIDES]
        if unknown:
            raise SystemExit(f"unknown side(s) {', '.join(unknown)}; choose from {', '.join(SIDES)}")
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side in sides:  # alternate, so a busy spell of the machine hits every side
                runs[side].append(one(side, args))
        full_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))  # fp32: the full weights
    medians = {side: statistics.median(r["prompts_per_second"] for r in rs) for side, rs in runs.items()}
    cpu_medians = {side: statistics.median(r["prompts_per_cpu_second"] for r in rs) for side, rs in runs.items()}
    ratios = {f"{a}_over_{b}": round(medians[a] / medians[b], 3) for a in medians for b in medians
              if a != b and (b == "ft" or b.startswith("trl"))}
    if not {"ft", "trl"} <= set(medians):
        report = {"model": model_name, "device": "cpu", "torch_threads": args.threads, "lora": args.lora,
                  "async": args.async_gen, "runs": runs, "median_prompts_per_second": medians,
                  "speedups_in_prompts_per_second": ratios, "issue_21_targets": targets(medians, runs, full_bytes, args.lora)}
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return
    speedup = medians["ft"] / medians["trl"]
    cpu_speedup = cpu_medians["ft"] / cpu_medians["trl"]
    report = {
        "model": model_name, "device": "cpu", "torch_threads": args.threads, "cpus": os.cpu_count(),
        "setting": {"steps": args.steps, "prompts_per_step": args.prompts_per_step,
                    "num_generations": args.num_generations, "max_completion_len": args.max_completion_len,
                    "loss_type": "dapo", "beta": 0.0, "generation": "colocated on the training model (TRL: model.generate; ft: its sampling loop)"},
        "lora": args.lora, "async": args.async_gen,
        "runs": runs,
        "median_prompts_per_second": medians,
        "speedups_in_prompts_per_second": ratios,
        "issue_21_targets": targets(medians, runs, full_bytes, args.lora),
        "speedup_ft_over_trl": round(speedup, 3),
        "median_prompts_per_cpu_second": cpu_medians,
        "cpu_speedup_ft_over_trl": round(cpu_speedup, 3),
        "target": {"wanted": f">= {TARGET}x TRL in prompts per second", "met": speedup >= TARGET,
                   "met_in_cpu_time": cpu_speedup >= TARGET},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
