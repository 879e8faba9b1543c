"""Measure `ft convert` + `ft validate` over a folder of axolotl configs; print the figures as JSON.

    python bench/axolotl_corpus.py /path/to/axolotl-examples            # summary
    python bench/axolotl_corpus.py /path/to/axolotl-examples --details  # plus one record per config

The folder holds axolotl YAML files (e.g. axolotl's ``examples/`` copied flat; nothing of axolotl's
is kept in this repository). Files without ``base_model`` (cloud launcher files) are skipped. Each
config is converted in-process (``ft convert SRC -o OUT``) and the result validated (``ft validate``),
with the click runner, so no subprocess per file. Reported:

- ``convert_exit``: counts of 0 (all expressed), 3 (a key that changes training was dropped), other;
- ``validated_here``: configs whose converted file ``ft validate`` accepts on this machine;
- ``validated_with_gpu_and_packages``: those plus the ones refused only for a package or a GPU this
  machine lacks (``validated_by_rl`` counts these per ``rl:`` method);
- ``refused``: configs ``ft convert`` refuses (exit 2, nothing written), by reason;
- ``validate_failures`` / ``machine_failures``: each validate problem, counted;
- ``dropped``: the keys behind exit 3, counted (what ft lacks);
- ``tracebacks``: any crash (there should be none).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

# problems that depend on this machine, not on the config: a package not installed, no GPU
MACHINE = ("is not installed", "needs a CUDA GPU", "needs a GPU with bf16", "no CUDA GPU")


def _problems(output: str) -> list[str]:
    """The problems `ft validate` / `ft convert` printed, without file:line prefixes (so they group)."""
    out = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.endswith(":") and line.startswith(("error", "Error")):
            continue
        line = line[2:] if line.startswith("- ") else line
        line = re.sub(r"^error: ", "", line)
        line = re.sub(r"^\S+\.ya?ml:(\d+:)?\s*", "", line)
        out.append(line[:160])
    return out or [output.strip()[:160]]


def measure(folder: Path, details: bool = False) -> dict[str, Any]:
    import yaml

    from ft.tools.testing import FtRunner

    runner = FtRunner()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".yml", ".yaml"))
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, src in enumerate(files):
            try:
                data = yaml.safe_load(src.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                data = None
            if not isinstance(data, dict) or not data.get("base_model"):
                records.append({"file": src.name, "skipped": True})
                continue
            out = Path(tmp) / f"{i}.yaml"
            conv = runner.invoke("convert", src, "-o", out, "--force")
            rec: dict[str, Any] = {"file": src.name, "rl": data.get("rl"), "convert_exit": conv.exit_code,
                                   "traceback": conv.traceback or None}
            if conv.exit_code == 3:
                text = out.read_text(encoding="utf-8") if out.exists() else ""
                block = text.split("# NOT expressed in ft, and they change training -- review them:", 1)
                dropped = []
                if len(block) == 2:
                    for line in block[1].splitlines()[1:]:
                        if not line.startswith("#   "):
                            break
                        dropped.append(line[4:].split(":", 1)[0].split("[", 1)[0])
                rec["dropped"] = dropped
            if out.exists():
                val = runner.invoke("validate", out)
                rec["valid"] = val.exit_code == 0
                rec["traceback"] = rec["traceback"] or val.traceback or None
                if val.exit_code != 0:
                    rec["problems"] = _problems(val.output)  # click puts stderr in output too
                    rec["machine_only"] = all(any(m in p for m in MACHINE) for p in rec["problems"])
            else:
                rec["valid"] = False
                rec["refused"] = _problems(conv.output)[0]
            records.append(rec)
    done = [r for r in records if not r.get("skipped")]
    by_rl: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in done:
        if r["rl"]:
            by_rl[str(r["rl"])][0] += r["valid"] or bool(r.get("machine_only"))
            by_rl[str(r["rl"])][1] += 1
    report: dict[str, Any] = {
        "configs": len(done),
        "skipped": [r["file"] for r in records if r.get("skipped")],
        "validated_here": sum(r["valid"] for r in done),
        # refused here only for want of a package or a GPU (flash-attn, torchao, bf16): valid where they are
        "validated_but_for_this_machine": sum(bool(r.get("machine_only")) for r in done),
        "validated_with_gpu_and_packages": sum(r["valid"] or bool(r.get("machine_only")) for r in done),
        "validated_by_rl": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_rl.items())},
        "convert_exit": dict(collections.Counter(str(r["convert_exit"]) for r in done)),
        "refused": dict(collections.Counter(r["refused"] for r in done if "refused" in r).most_common()),
        "validate_failures": dict(collections.Counter(p for r in done if not r.get("machine_only")
                                                      for p in r.get("problems", [])).most_common()),
        "machine_failures": dict(collections.Counter(p for r in done if r.get("machine_only")
                                                     for p in r.get("problems", [])).most_common()),
        "dropped": dict(collections.Counter(k for r in done for k in set(r.get("dropped", []))).most_common()),
        "tracebacks": [r["file"] for r in done if r.get("traceback")],
    }
    if details:
        report["records"] = done
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder of axolotl YAML configs")
    parser.add_argument("--details", action="store_true", help="add one record per config")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    report = measure(args.folder, args.details)
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
