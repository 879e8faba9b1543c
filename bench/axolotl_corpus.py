"""Measure `ft convert` + `ft validate` over a folder of axolotl configs; print the figures as JSON.

    python bench/axolotl_corpus.py /path/to/axolotl-examples            # summary
    python bench/axolotl_corpus.py /path/to/axolotl-examples --details  # plus one record per config

The folder holds axolotl YAML files (e.g. axolotl's ``examples/`` copied flat; nothing of axolotl's
is kept in this repository). Files without ``base_model`` (cloud launcher files) are skipped. Each
config is converted in-process (``ft convert SRC -o OUT``) and the result validated (``ft validate``),
with the click runner, so no subprocess per file. Reported:

- ``convert_exit``: counts of 0 (all expressed), 3 (a key that changes training was dropped), other;
- ``validated``: configs whose converted file ``ft validate`` accepts, and per ``rl:`` method;
- ``validate_failures``: the first line of each validate error, counted;
- ``dropped``: the keys behind exit 3, counted (what ft lacks);
- ``tracebacks``: any crash (there should be none).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def _first_problem(output: str) -> str:
    """The first error line of `ft validate`, without the file:line prefix (so lines group)."""
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith(("Error", "error:")) and line.endswith(":"):
            continue
        if ".yaml:" in line:
            line = line.split(".yaml:", 1)[1]
            line = line.split(":", 1)[1].strip() if line.split(":", 1)[0].strip().isdigit() else line.strip()
        return line[:160]
    return output.strip()[:160]


def measure(folder: Path, details: bool = False) -> dict[str, Any]:
    import yaml

    from ft.testing import FtRunner

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
                    rec["problem"] = _first_problem(val.output + val.stderr)
            else:
                rec["valid"] = False
                rec["problem"] = _first_problem(conv.output + conv.stderr)
            records.append(rec)
    done = [r for r in records if not r.get("skipped")]
    by_rl: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in done:
        if r["rl"]:
            by_rl[str(r["rl"])][0] += r["valid"]
            by_rl[str(r["rl"])][1] += 1
    report: dict[str, Any] = {
        "configs": len(done),
        "skipped": [r["file"] for r in records if r.get("skipped")],
        "validated": sum(r["valid"] for r in done),
        "validated_by_rl": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_rl.items())},
        "convert_exit": dict(collections.Counter(str(r["convert_exit"]) for r in done)),
        "validate_failures": dict(collections.Counter(r["problem"] for r in done if "problem" in r).most_common()),
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
