"""A short `ft run -p liger` on the tiny model that asserts Liger's patches ran in training.

Run by bench/gpu_check.sh on the device machine (CUDA, liger-kernel installed). ft's core checks
after the first training step that every forward Liger bound (RMSNorm, SwiGLU MLP, the model's
fused linear + cross-entropy forward) was called and every module-level name it rebound is still
Liger's; this script asserts that the run passed that check and that the records name Liger's
kernels. Writes one JSON object to stdout; exit 0 only when every assertion held.

    python3 bench/liger_check.py [--steps 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    import yaml

    from ft.tools.tiny import make_chat_rows, make_tiny, write_jsonl

    root = args.workdir or Path(tempfile.mkdtemp(prefix="ft-liger-check-"))
    model = make_tiny(root / "tiny")
    data = write_jsonl(root / "train.jsonl", make_chat_rows(32, seed=0))
    config = root / "liger.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": str(model), "datasets": [{"path": str(data), "type": "chat_template"}],
        "sequence_len": 128, "micro_batch_size": 4, "max_steps": args.steps, "logging_steps": 1,
        "learning_rate": 1e-3, "bf16": "auto", "seed": 0, "dataset_num_proc": 1,
        "output_dir": str(root / "out"), "dataset_prepared_path": str(root / "prepared"),
    }))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ft.cli", "run", str(config), "-p", "liger"],
                          capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    checks = {
        "exit code 0": proc.returncode == 0,
        "Liger's RMSNorm bound on the 5 norms": "[liger] LlamaRMSNorm.forward x5 -> liger_kernel" in output,
        "Liger's fused linear + cross-entropy forward": "[liger] LlamaForCausalLM.forward -> liger_kernel" in output,
        "every patch ran in step 1": "kernel patches: all" in output and "in effect after training step 1" in output,
        "no patch reported as not in effect": "were not in effect" not in output,
    }
    manifest = root / "out" / "ft_plugins.json"
    patches = json.loads(manifest.read_text()).get("patches", []) if manifest.exists() else []
    checks["ft_plugins.json lists liger's patches"] = any(p.startswith("[liger]") for p in patches)
    report = {"ok": all(checks.values()), "checks": checks, "seconds": round(time.perf_counter() - started, 1),
              "patch_lines": [line for line in output.splitlines() if "liger" in line or "kernel patches" in line][:40],
              "output_tail": output[-3000:] if not all(checks.values()) else ""}
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
