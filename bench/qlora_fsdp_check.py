"""QLoRA + FSDP2 on the tiny model: the sharded run must train as a one-process QLoRA run does.

Run by ``bash bench/gpu_check.sh qlora-fsdp`` on the device machine; also runs on CPU (``--device cpu``,
2 processes over gloo: what tests/engine/test_distributed.py checks). Two ``ft run``s on the same rows:

- ``plugins: [lora, qlora, fsdp]`` with ``--nproc N`` (N = the GPUs here, at most 2; 2 on CPU), micro batch 4;
- ``plugins: [lora, qlora]`` in one process, micro batch 4 x N (the same global batch, the same rows).

LoRA starts at zero, so step 1's loss is the 4-bit base's on those rows: it must agree to 1e-3 in fp32
(measured on CPU: 1e-6), 2e-2 in bf16 (bf16 sums in another order, and FSDP casts the whole model to bf16
while the one-process run keeps norms and LoRA in fp32). Also checked: the adapter and base_quantization.json
(the 4-bit storage: the compute dtype) are written, and ``ft infer`` loads the adapter on its 4-bit base.
Writes one JSON object to stdout; exit 0 only when every check held.

    python3 bench/qlora_fsdp_check.py [--device cuda|cpu] [--dtype bf16|fp32] [--offload] [--steps 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP = re.compile(r"^step (\d+)/\d+\s+loss ([0-9.]+)", re.M)


def run(config: Path, nproc: int | None, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[float]]:
    command = [sys.executable, "-m", "ft.cli", "run", str(config), "--overwrite"]
    if nproc:
        command += ["--nproc", str(nproc)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    losses = [float(loss) for _, loss in STEP.findall(proc.stdout + proc.stderr)]
    return proc, losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--offload", action="store_true", help="fsdp.offload_params: shards in CPU memory (GPU only)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    import yaml

    from ft.tools.tiny import make_chat_rows, make_tiny, write_jsonl

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        nproc = 2
    else:
        nproc = min(torch.cuda.device_count(), 2)
        if not nproc:
            print(json.dumps({"ok": False, "error": "--device cuda: no CUDA GPU here (use --device cpu)"}))
            return 1
    root = args.workdir or Path(tempfile.mkdtemp(prefix="ft-qlora-fsdp-check-"))
    model = make_tiny(root / "tiny")
    data = write_jsonl(root / "train.jsonl", make_chat_rows(64, seed=3))
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    common = {
        "base_model": str(model), "datasets": [{"path": str(data), "type": "chat_template"}],
        "sequence_len": 128, "max_steps": args.steps, "logging_steps": 1, "learning_rate": 1e-2,
        "lr_scheduler": "constant", "seed": 7, "dataset_prepared_path": str(root / "prepared"),
        "bf16": args.dtype == "bf16" and args.device == "cuda",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "qlora": {"compute_dtype": dtype},
    }
    sharded, single = root / "fsdp.yaml", root / "single.yaml"
    sharded.write_text(yaml.safe_dump({**common, "plugins": ["lora", "qlora", "fsdp"], "micro_batch_size": 4,
                                       "fsdp": {"mixed_precision": args.dtype, "offload_params": args.offload}, "output_dir": str(root / "fsdp")}))
    single.write_text(yaml.safe_dump({**common, "plugins": ["lora", "qlora"], "micro_batch_size": 4 * nproc,
                                      "output_dir": str(root / "single")}))
    started = time.perf_counter()
    proc_f, losses_f = run(sharded, nproc, env)
    proc_s, losses_s = run(single, None, env)
    tolerance = 2e-2 if args.dtype == "bf16" else 1e-3
    out = root / "fsdp"
    quant = json.loads((out / "base_quantization.json").read_text()) if (out / "base_quantization.json").exists() else {}
    checks = {
        "fsdp run exit code 0": proc_f.returncode == 0,
        "one-process run exit code 0": proc_s.returncode == 0,
        f"fsdp sharded over {nproc} process(es)": f"across {nproc} processes" in proc_f.stdout + proc_f.stderr,
        "both logged every step": len(losses_f) == len(losses_s) == args.steps,
        f"step 1 loss agrees to {tolerance}": bool(losses_f and losses_s) and abs(losses_f[0] - losses_s[0]) < tolerance,
        "the loss falls": len(losses_f) == args.steps and losses_f[-1] < losses_f[0],
        "adapter written": (out / "adapter_model.safetensors").is_file(),
        f"4-bit weights stored as {dtype}": quant.get("bnb_4bit_quant_storage") == dtype,
    }
    if checks["adapter written"]:
        infer = subprocess.run([sys.executable, "-m", "ft.cli", "infer", str(out), "What is 2 plus 3?",
                                "--max-new-tokens", "4"], capture_output=True, text=True, env=env, timeout=120)
        checks["ft infer loads the adapter on its 4-bit base"] = infer.returncode == 0
    report = {"ok": all(checks.values()), "checks": checks, "device": args.device, "nproc": nproc,
              "dtype": args.dtype, "offload_params": args.offload, "losses_fsdp": losses_f, "losses_one_process": losses_s,
              "seconds": round(time.perf_counter() - started, 1)}
    if not report["ok"]:
        report["fsdp_tail"] = (proc_f.stdout + proc_f.stderr)[-3000:]
        report["one_process_tail"] = (proc_s.stdout + proc_s.stderr)[-2000:]
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
