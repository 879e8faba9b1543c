"""How long the CLIs take to start: `ft --help`, `ft validate`, `trl --help`, `axolotl --help`; JSON figures.

    python bench/startup.py                                  # 10 rounds
    python bench/startup.py --repeat 20 --axolotl-python /work/venv-axolotl/bin/python

Each CLI runs as its console script does (``python SCRIPT ARGS``, the script located through its
distribution's metadata), not through a shell shim such as pyenv's, which adds its own start-up.
The commands run in rounds, one of each per round, so a noisy machine slows all of them alike;
per command the minimum and median of the wall time and of the CPU time (user + system, from the
child's rusage) are reported. ``python -c pass`` (the interpreter and its site-packages' .pth files)
is the floor no CLI can go below.

- ``ft_help``: ``ft --help`` with the plugin command list cached (``ft.commands_cache``), as every
  run after the first one finds it; ``ft_help_cold``: with an empty cache dir (the first run after a
  plugin is installed, removed or edited: it loads every plugin and writes the cache);
- ``ft_validate``: ``ft validate examples/tiny.yaml``;
- ``trl_help``: ``trl --help`` from the python running this script (TRL installed there);
- ``axolotl_help``: ``axolotl --help`` from ``--axolotl-python`` (a venv with axolotl installed);
  reported as unavailable, with the reason, when it is not installed there or does not start. Its
  CLI starts with the training stack ft's dev environment already has, so a venv over it will do,
  leaving torch alone: ``python -m venv --system-site-packages /work/venv-axolotl &&
  /work/venv-axolotl/bin/pip install --no-deps axolotl`` (axolotl 0.19 here).

``--compare PYTHON`` adds ``ft_help@compare`` and ``ft_validate@compare``: the ft another interpreter
runs (a checkout of the code before a change, in its own venv), timed in the same rounds.

ft's own sources are byte-compiled first (an installed package has its .pyc; an editable checkout
run with ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module on every start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 0.15  # issue 24: `ft --help` in 0.15 s or less

LOCATE = """
import importlib.metadata as md, json, sys
dist, name = sys.argv[1], sys.argv[2]
try:
    d = md.distribution(dist)
except md.PackageNotFoundError:
    print(json.dumps({"error": f"{dist} is not installed for {sys.executable}"})); raise SystemExit
eps = [e for e in d.entry_points if e.group == "console_scripts" and e.name == name]
files = [f for f in (d.files or []) if f.name == name and f.parent.name in ("bin", "Scripts")]
script = next((str(f.locate().resolve()) for f in files if f.locate().exists()), None)
print(json.dumps({"version": d.version, "script": script, "entry_point": eps[0].value if eps else None}))
"""


def locate(python: str, dist: str, name: str) -> dict[str, Any]:
    """The console script ``name`` of distribution ``dist`` for interpreter ``python``."""
    # from "/", so that a checkout's ft.egg-info in the working directory does not stand in for the installed dist
    res = subprocess.run([python, "-c", LOCATE, dist, name], capture_output=True, text=True, cwd="/")
    if res.returncode != 0:
        return {"error": f"{python} cannot be asked: {res.stderr.strip()[-300:]}"}
    found = json.loads(res.stdout)
    if "error" in found:
        return found
    if not found.get("entry_point"):
        return {"error": f"{dist} {found['version']} has no console script '{name}'"}
    if found["script"]:
        found["argv"] = [python, found["script"]]
    else:  # an editable or script-less install: run the entry point the way the script would
        module, func = found["entry_point"].split(":")
        found["argv"] = [python, "-c", f"import sys; from {module} import {func}; sys.argv[0] = {name!r}; sys.exit({func}())"]
    return found


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (user + system of the child), exit code, stderr tail."""
    before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    return wall, _children_cpu() - before, proc.returncode, proc.stderr.decode(errors="replace")[-800:]


def _children_cpu() -> float:
    """CPU seconds of the children reaped so far (one at a time here, so a difference is one run's)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def shown(argv: list[str]) -> str:
    words = [Path(argv[0]).name]
    for a in argv[1:]:
        words.append(Path(a).name if os.path.isabs(a) else (f"'{a[:40]}...'" if " " in a else a))
    return " ".join(words)


def summary(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3)}


COMPILE = """
import compileall, os, sys
import ft, ft_plugins
for module in (ft, ft_plugins):
    compileall.compile_dir(os.path.dirname(module.__file__), quiet=1)
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="Rounds (each runs every command once).")
    parser.add_argument("--axolotl-python", default="/work/venv-axolotl/bin/python",
                        help="The python of an environment with axolotl installed.")
    parser.add_argument("--compare", metavar="PYTHON", default=None,
                        help="Also time `ft --help` and `ft validate` of the ft that PYTHON runs (another "
                             "checkout's venv, say): reported as ft_help@compare and ft_validate@compare.")
    parser.add_argument("--nice", type=int, default=5, help="Niceness of this benchmark (a shared machine).")
    parser.add_argument("--only", nargs="*", default=None, help="Run only these commands (by name).")
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    commands: dict[str, tuple[list[str], str | None]] = {}  # name -> (argv, cache dir to empty before each run)
    unavailable: dict[str, str] = {}
    versions: dict[str, str] = {}
    cold = tempfile.mkdtemp(prefix="ft-startup-cold-")
    commands["python_floor"] = ([sys.executable, "-c", "pass"], None)
    targets = [("ft", sys.executable, ""), ("trl", sys.executable, ""), ("axolotl", args.axolotl_python, "")]
    if args.compare:
        targets.insert(1, ("ft", args.compare, "@compare"))
    for dist, python, suffix in targets:
        label = f"{dist}_help{suffix}"
        if not Path(python).exists():
            unavailable[label] = f"no interpreter at {python}"
            continue
        found = locate(python, dist, dist)
        if "error" in found:
            unavailable[label] = found["error"]
            continue
        versions[dist + suffix] = found["version"]
        commands[label] = (found["argv"] + ["--help"], None)
        if dist == "ft":
            subprocess.run([python, "-c", COMPILE], env=env, check=True)
            if not suffix:
                commands["ft_help_cold"] = (found["argv"] + ["--help"], cold)
            commands[f"ft_validate{suffix}"] = (found["argv"] + ["validate", "examples/tiny.yaml"], None)
    if args.only:
        commands = {k: v for k, v in commands.items() if k in args.only}

    for name, (cmd, _empty) in list(commands.items()):  # warm-up: fills ft's cache and the OS's file cache
        _wall, _cpu, code, err = run_once(cmd, env)
        if code != 0:
            unavailable[name] = f"exit {code}: {err.strip().splitlines()[-1] if err.strip() else '(no output)'}"
            del commands[name]

    walls: dict[str, list[float]] = {n: [] for n in commands}
    cpus: dict[str, list[float]] = {n: [] for n in commands}
    for _round in range(args.repeat):
        for name, (cmd, empty) in commands.items():
            run_env = env
            if empty:
                shutil.rmtree(empty, ignore_errors=True)
                run_env = {**env, "FT_CACHE_DIR": empty}
            wall, cpu, code, err = run_once(cmd, run_env)
            if code != 0:
                raise SystemExit(f"{name} failed (exit {code}): {err}")
            walls[name].append(wall)
            cpus[name].append(cpu)
    shutil.rmtree(cold, ignore_errors=True)

    report = {
        "machine": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
                    "python": sys.version.split()[0], "versions": versions},
        "repeat": args.repeat,
        "results": {n: {"command": shown(commands[n][0]) + (" (empty FT_CACHE_DIR)" if commands[n][1] else ""),
                        "wall_s": summary(walls[n]), "cpu_s": summary(cpus[n])} for n in commands},
        "unavailable": unavailable,
    }
    if "ft_help" in walls:
        report["goal"] = {"ft_help_wall_min_s": round(min(walls["ft_help"]), 3), "goal_s": GOAL_S,
                          "met": min(walls["ft_help"]) <= GOAL_S}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
