#!/usr/bin/env bash
# The ONE device-machine check for issue 9 (varlen attention, Liger, compile, training throughput)
# and issue 22 item 15 (Liger's patches run in training).
#
# Prepare, on the development machine, in the project root (see ../shared/device/README.md):
#   echo /.whl/ >> .git/info/exclude
#   ../shared/device/fetch-wheels.sh        # datasets, pydantic, liger-kernel, bitsandbytes ... into .whl/
#   # the image may lack pytest; its wheels are small (this script says so in pytest_gpu.log if missing):
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl pytest iniconfig
# Then one device call with carry [".whl"], timeout_s 600 and the command:
#   bash bench/gpu_check.sh          # issue 9's checks
#   bash bench/gpu_check.sh vllm     # issue 21's: GRPO on the image's vllm (see the section below the installs)
#   bash bench/gpu_check.sh qlora-fsdp   # issue 23's: QLoRA + FSDP2 on the GPU(s) (bitsandbytes in .whl/)
#
# Writes under $OUT (at most 8 files, no sub-folders):
#   env.json          versions, the GPU, torch's varlen_attn signature, whether flash-attn / liger import
#   install.log       the offline installs
#   pytest_gpu.log    pytest -m gpu (varlen kernel vs reference, Liger vs unpatched: loss and gradients)
#   liger_check.json  bench/liger_check.py: a 3-step `ft run -p liger` on the tiny model; ok only if ft's
#                     after-step-1 check found every Liger patch in effect (issue 22 item 15: transformers'
#                     hub kernels used to drop Liger's RMSNorm forwards silently)
#   liger_check.log   its stderr
#   bench_train.json  bench/train.py --device cuda: tokens/s, MFU, peak GiB, losses, issue 9 targets
#                     (written after each configuration, so a run cut short still reports)
#   bench_train.log   the benchmark's progress and ft's logs
#   summary.json      exit codes and seconds of each part
# Budget: about 30 s installing, <= 150 s tests, <= 75 s Liger check, <= 320 s benchmark (hard limits
# below), under 600 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
t0=$(date +%s)

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  >"$OUT/install.log" 2>&1
install_rc=$?
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1
install_rc=$((install_rc + $?))
t_install=$(($(date +%s) - t0))

# -- issue 21: GRPO on the real vllm package (`bash bench/gpu_check.sh vllm` runs only this part) ------------
# Needs the image's own vllm (`import vllm`); unverified: written on a machine without a GPU. Writes:
#   vllm_pytest.log   tests/plugins/test_grpo_vllm_real.py with FT_VLLM_PYTHON=python3: server (full reload, LoRA
#                     adapter-only sync, async) and colocate, on the tiny model, on the GPU
#   bench_grpo_vllm.json / .log   bench/grpo.py: ft HF generation vs ft + vLLM colocate and server (LoRA),
#                     prompts/s and sync bytes/seconds; then full fine-tuning's sync figures
#   vllm_summary.json exit codes and seconds
vllm_check() {
  local t=$(date +%s) rc_tests rc_bench rc_full
  if ! python3 -c "import vllm" >>"$OUT/install.log" 2>&1; then
    echo '{"vllm": "not importable on this image; see install.log"}' >"$OUT/vllm_summary.json"
    return 1
  fi
  FT_VLLM_PYTHON=$(command -v python3) timeout 240 python3 -m pytest -q -p no:cacheprovider -rA \
    tests/plugins/test_grpo_vllm_real.py >"$OUT/vllm_pytest.log" 2>&1
  rc_tests=$?
  FT_VLLM_PYTHON=$(command -v python3) timeout 180 python3 bench/grpo.py --sides ft,ft-vllm-colocate,ft-vllm-server \
    --lora --repeats 1 --steps 6 --vllm-dtype bfloat16 --out "$OUT/bench_grpo_vllm.json" >"$OUT/bench_grpo_vllm.log" 2>&1
  rc_bench=$?
  FT_VLLM_PYTHON=$(command -v python3) timeout 120 python3 bench/grpo.py --sides ft-vllm-colocate --repeats 1 \
    --steps 4 --out "$OUT/bench_grpo_vllm_full.json" >>"$OUT/bench_grpo_vllm.log" 2>&1
  rc_full=$?
  cat >"$OUT/vllm_summary.json" <<EOF2
{"vllm": "$(python3 -c 'import vllm; print(vllm.__version__)')", "tests_rc": $rc_tests, "bench_lora_rc": $rc_bench,
 "bench_full_rc": $rc_full, "seconds": $(($(date +%s) - t)), "note": "rc 124 = cut by the time limit"}
EOF2
  cat "$OUT/vllm_summary.json"
  tail -n 5 "$OUT/vllm_pytest.log"
}
if [ "${1:-}" = "vllm" ]; then
  vllm_check
  exit $?
fi

# -- issue 23: QLoRA + FSDP2 (`bash bench/gpu_check.sh qlora-fsdp` runs only this part) ----------------------
# Unverified: written on a machine without a GPU (the same script passes on CPU, 2 processes over gloo:
# `python bench/qlora_fsdp_check.py --device cpu --dtype fp32`). Needs bitsandbytes (in .whl/). Writes:
#   qlora_fsdp_bf16.json / _fp32.json / _offload.json   bench/qlora_fsdp_check.py: `ft run -p lora -p qlora -p fsdp
#                     --nproc N` (N = min(GPUs, 2); with 1 GPU FSDP2 runs over 1 rank: the CUDA path of the
#                     4-bit weights through fully_shard, not the split) vs one-process QLoRA on the same rows:
#                     step-1 loss, the adapter, the 4-bit storage dtype, ft infer on the adapter; _offload: bf16
#                     with fsdp.offload_params (most of axolotl's QLoRA + FSDP examples offload)
#   qlora_fsdp.log    their stderr
#   qlora_fsdp_summary.json  exit codes and seconds
qlora_fsdp_check() {
  local t=$(date +%s) rc_bf16 rc_fp32 rc_offload
  timeout 170 python3 bench/qlora_fsdp_check.py --device cuda --dtype bf16 >"$OUT/qlora_fsdp_bf16.json" \
    2>"$OUT/qlora_fsdp.log"
  rc_bf16=$?
  timeout 170 python3 bench/qlora_fsdp_check.py --device cuda --dtype fp32 >"$OUT/qlora_fsdp_fp32.json" \
    2>>"$OUT/qlora_fsdp.log"
  rc_fp32=$?
  timeout 170 python3 bench/qlora_fsdp_check.py --device cuda --dtype bf16 --offload \
    >"$OUT/qlora_fsdp_offload.json" 2>>"$OUT/qlora_fsdp.log"
  rc_offload=$?
  cat >"$OUT/qlora_fsdp_summary.json" <<EOF2
{"bf16_rc": $rc_bf16, "fp32_rc": $rc_fp32, "offload_rc": $rc_offload,
 "gpus": $(python3 -c 'import torch; print(torch.cuda.device_count())'),
 "seconds": $(($(date +%s) - t)), "note": "rc 0 = every check held; 124 = cut by the time limit"}
EOF2
  cat "$OUT/qlora_fsdp_summary.json"
  head -n 14 "$OUT/qlora_fsdp_bf16.json"
  return $((rc_bf16 != 0 || rc_fp32 != 0 || rc_offload != 0))
}
if [ "${1:-}" = "qlora-fsdp" ]; then
  qlora_fsdp_check
  exit $?
fi

python3 - >"$OUT/env.json" 2>>"$OUT/install.log" <<'EOF'
import importlib, importlib.util, inspect, json, subprocess
import torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
for mod in ("transformers", "peft", "accelerate", "datasets", "pydantic", "triton", "liger_kernel", "flash_attn",
            "pytest"):
    try:
        m = importlib.import_module(mod)
        env[mod] = getattr(m, "__version__", "imported")
    except Exception as exc:  # record why, keep going
        env[mod] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
try:
    from torch.nn.attention.varlen import varlen_attn
    env["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
except Exception as exc:
    env["varlen_attn_signature"] = f"unavailable: {exc}"
try:
    from ft_plugins import varlen
    kernel = varlen.resolve_cuda_kernel("auto")
    env["ft_varlen_cuda_kernel"] = getattr(kernel, "label", None)
except Exception as exc:
    env["ft_varlen_cuda_kernel"] = f"error: {exc}"
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError as exc:
    env["nvidia_smi"] = f"unavailable: {exc}"
print(json.dumps(env, indent=2))
EOF

t1=$(date +%s)
if python3 -c "import pytest" 2>/dev/null; then
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider -rA --continue-on-collection-errors tests >"$OUT/pytest_gpu.log" 2>&1
  pytest_rc=$?
else
  echo "pytest is not installed on this image: add its wheels to .whl (see the header of bench/gpu_check.sh)" \
    >"$OUT/pytest_gpu.log"
  pytest_rc=127
fi
t_pytest=$(($(date +%s) - t1))

t3=$(date +%s)
timeout 75 python3 bench/liger_check.py >"$OUT/liger_check.json" 2>"$OUT/liger_check.log"
liger_rc=$?
t_liger=$(($(date +%s) - t3))

t2=$(date +%s)
timeout 320 python3 bench/train.py --device cuda --out "$OUT/bench_train.json" \
  >/dev/null 2>"$OUT/bench_train.log"
bench_rc=$?
t_bench=$(($(date +%s) - t2))

cat >"$OUT/summary.json" <<EOF
{"install_rc": $install_rc, "install_seconds": $t_install,
 "pytest_gpu_rc": $pytest_rc, "pytest_gpu_seconds": $t_pytest,
 "liger_check_rc": $liger_rc, "liger_check_seconds": $t_liger,
 "bench_rc": $bench_rc, "bench_seconds": $t_bench,
 "total_seconds": $(($(date +%s) - t0)),
 "note": "rc 124 = cut by the time limit; bench_train.json then holds the configurations that finished"}
EOF
cat "$OUT/summary.json"
grep -E "^\[bench\]" "$OUT/bench_train.log" || true
tail -n 5 "$OUT/pytest_gpu.log" || true
head -n 12 "$OUT/liger_check.json" || true
