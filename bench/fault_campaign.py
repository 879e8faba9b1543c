"""Issue 22's fault campaign, repeated end to end on the tiny model: prints one JSON object.

Every case is a subprocess ``ft ...`` with a timeout, and whether it held is checked, never assumed:

- ``kill9``: for each method, ``kill -9`` at a step end (then resume) and inside the final save (then rerun).
  Held: the resumed run's last checkpoint and the final weights are bit-identical to an uninterrupted run's,
  metrics.json ends at exactly max_steps, no checkpoint beyond it, no half-written save left.
- ``bad_data``: bad preference rows and misbehaving rewards. Held: an ft error (exit 2, no traceback, names
  the file/reward) or, for rows ft drops, a report that counts them; rows that must be kept are kept.
- ``hostile_config``: an alias bomb, a huge config, /dev/zero, non-UTF-8, deep nesting, for each command
  that reads a config. Held: an ft error naming the file within the timeout.
- ``secrets``: URL query tokens, Bearer headers, user:pass@ URLs and HF_ENDPOINT credentials in a config,
  a dataset entry, ``--set`` and the environment. Held: none of them in any file of the output dir or the
  data cache (key.json included), nor in stdout/stderr.
- ``paths``: merge/overwrite/convert onto existing paths. Held: refused with an ft error, and the existing
  files byte-identical afterwards.

    OMP_NUM_THREADS=1 nice -n 19 python bench/fault_campaign.py [--areas kill9,paths] [--methods sft,dpo]

The kill machinery is tests/engine/test_crash.py's (a plugin that pauses ``ft run`` at a known point, so the kill
lands where it is meant to).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny"
METHODS = ("sft", "dpo", "kto", "orpo", "simpo", "grpo", "reward_model", "prm")
AREAS = ("kill9", "bad_data", "hostile_config", "secrets", "paths")
MAX_STEPS, SAVE_STEPS = 5, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
FT = [sys.executable, "-c", "import sys; sys.argv[0] = 'ft'; from ft.cli import main; main()"]


def pausing_run_script() -> str:
    """tests/engine/test_crash.py's PAUSING_RUN: ``ft run`` that waits at "step_end:N" / "saving:N" / "final:0"."""
    sys.path.insert(0, str(ROOT / "tests" / "engine"))
    try:
        from test_crash import PAUSING_RUN
    finally:
        sys.path.remove(str(ROOT / "tests" / "engine"))
    return PAUSING_RUN


class Campaign:
    def __init__(self, work: Path, only: list[str] | None = None):
        self.work, self.only = work, only
        self.cases: dict[str, list[dict[str, Any]]] = {}
        from ft.tools.tiny import make_tiny

        self.model = make_tiny(work / "model")

    # -- recording ------------------------------------------------------------------------------------

    def case(self, area: str, name: str, check: Callable[[], str | None]) -> None:
        """Run one case; ``check`` returns None when it held, else what happened."""
        if self.only and not any(part in name for part in self.only):
            return
        start = time.monotonic()
        try:
            problem = check()
        except Exception as exc:  # the campaign itself must go on and say what broke
            problem = f"campaign error: {type(exc).__name__}: {exc}"
        row = {"case": name, "held": problem is None, "seconds": round(time.monotonic() - start, 1)}
        if problem is not None:
            row["what_happened"] = problem
        self.cases.setdefault(area, []).append(row)
        print(f"[{area}] {name}: {'held' if problem is None else 'DID NOT HOLD: ' + problem}", file=sys.stderr,
              flush=True)

    def summary(self) -> dict[str, Any]:
        areas = {}
        for area, rows in self.cases.items():
            areas[area] = {"tried": len(rows), "held": sum(r["held"] for r in rows),
                           "not_held": [r for r in rows if not r["held"]],
                           "cases": [r["case"] for r in rows]}
        return {"tried": sum(a["tried"] for a in areas.values()), "held": sum(a["held"] for a in areas.values()),
                "areas": areas}

    # -- running ft -------------------------------------------------------------------------------------

    def ft(self, *args: str | Path, timeout: float = 300, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([*FT, *map(str, args)], capture_output=True, text=True, errors="replace",
                                  timeout=timeout, env={**ENV, **(env or {})}, cwd=cwd or self.work)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, -1, _text(exc.stdout), _text(exc.stderr) +
                                               f"\n[timed out after {timeout:.0f} s]")

    def paused(self, config: Path, where: str, tag: str, *args: str,
               timeout: float = 300) -> tuple[subprocess.Popen, Path]:
        """``ft run CONFIG ARGS`` paused at ``where`` (test_crash's machinery); returns the process, still running."""
        d = config.parent / f"pause-{tag}"
        d.mkdir()
        script = d / "pausing_run.py"
        text = pausing_run_script()
        plain = 'sys.argv = ["ft", "run", config]'
        assert plain in text, "tests/engine/test_crash.py's PAUSING_RUN changed: update fault_campaign.paused"
        script.write_text(text.replace(plain, 'sys.argv = ["ft", "run", config, *sys.argv[5:]]'))
        marker, go = d / "paused", d / "go"
        with open(d / "stderr.txt", "wb") as err:
            proc = subprocess.Popen([sys.executable, str(script), str(config), str(marker), str(go), where, *args],
                                    stdout=subprocess.DEVNULL, stderr=err, env=ENV, cwd=self.work)
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if proc.poll() is not None:
                raise CaseFailed(f"the run ended (exit {proc.returncode}) before reaching {where}: "
                                 f"{tail((d / 'stderr.txt').read_text(errors='replace'))}")
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise CaseFailed(f"timed out before reaching {where}")
            time.sleep(0.05)
        return proc, d

    # -- configs ------------------------------------------------------------------------------------------

    def method_config(self, method: str, root: Path, **overrides: Any) -> Path:
        data = {"sft": ("chat.jsonl", "chat_template"), "kto": ("preference.jsonl", "kto"),
                "grpo": ("prompts.jsonl", "prompt"), "reward_model": ("reward_pairs.jsonl", "preference")}
        path, kind = data.get(method, ("preference.jsonl", "preference"))
        source = TINY / path
        if method == "prm":  # step-labelled rows (examples/tiny has none)
            source, kind = self.work / "steps.jsonl", "stepwise_supervised"
            if not source.exists():
                jsonl(source, [{"prompt": f"What is {a} plus {b}?", "completions": [f"{a} plus {b}", f"is {a + b + k}."],
                                "labels": [True, k == 0]} for a in range(4) for b in range(3) for k in (0, 1)])
        config: dict[str, Any] = {
            "base_model": str(self.model), "datasets": [{"path": str(source), "type": kind}],
            "dataset_prepared_path": str(self.work / "prepared"), "dataset_num_proc": 1,
            "output_dir": str(root / "out"), "sequence_len": 128, "micro_batch_size": 4,
            "gradient_accumulation_steps": 1, "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS,
            "logging_steps": 1, "learning_rate": 1.0e-3, "seed": 1, "bf16": False,
        }
        if method != "sft":
            config["method"] = method
        if method == "grpo":
            config["sequence_len"] = 64
            config["grpo"] = {"num_generations": 4, "max_completion_len": 8, "beta": 0.0,
                              "rewards": [{"name": "regex_match", "pattern": "\\d"}]}
        config.update(overrides)
        root.mkdir(parents=True, exist_ok=True)
        file = root / "config.yaml"
        file.write_text(yaml.safe_dump(config, sort_keys=False))
        return file


class CaseFailed(Exception):
    pass


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def tail(text: str, n: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".ft-run.lock"}


def same_files(before: dict[str, bytes], directory: Path) -> str | None:
    after = snapshot(directory)
    if after == before:
        return None
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return f"files in {directory.name} changed: {changed[:8]}"


def ft_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str | None:
    """None when ``result`` is an ft error: exit ``code``, no traceback, every fragment in its output."""
    output = result.stdout + result.stderr
    if "Traceback" in output:
        return f"a traceback (exit {result.returncode}): {tail(output)}"
    if result.returncode != code:
        return f"exit {result.returncode}, not {code}: {tail(output)}"
    missing = [f for f in fragments if f not in output]
    if missing:
        return f"the message lacks {missing}: {tail(output)}"
    return None


def ok(result: subprocess.CompletedProcess) -> str | None:
    output = result.stdout + result.stderr
    if result.returncode != 0 or "Traceback" in output:
        return f"exit {result.returncode}: {tail(output)}"
    return None


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def weight_difference(a: Path, b: Path) -> str | None:
    """None when the two directories hold bit-identical model.safetensors tensors."""
    wa, wb = weights(a), weights(b)
    if sorted(wa) != sorted(wb):
        return f"other tensors: {sorted(set(wa) ^ set(wb))[:4]}"
    worst = max(((wa[k].double() - wb[k].double()).abs().max().item(), k) for k in wa)
    return None if worst[0] == 0 else f"weights differ from the uninterrupted run's: max |diff| {worst[0]:.3g} in {worst[1]}"


def steps_of(out: Path) -> tuple[int, list[int]]:
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["summary"]["steps"], sorted(row["step"] for row in metrics["history"] if "step" in row)


# -- kill -9 -----------------------------------------------------------------------------------------------


def kill9(c: Campaign, methods: list[str]) -> None:
    for method in methods:
        kill9_method(c, method)


def kill9_method(c: Campaign, method: str) -> None:
    """A reference run, then one killed at a step end, resumed, killed inside its final save and rerun."""
    root = c.work / "kill9" / method
    reference = c.method_config(method, root / "reference")
    ref_out = root / "reference" / "out"
    done = c.ft("run", reference, timeout=400)
    if ok(done):
        c.case("kill9", f"{method}: uninterrupted reference run", lambda: ok(done))
        return
    config = c.method_config(method, root / "killed")
    out = root / "killed" / "out"
    state: dict[str, Any] = {}

    def during_training() -> str | None:
        proc, _ = c.paused(config, "step_end:3", "train")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            return f"the run was not killed (exit {proc.returncode})"
        if (out / "metrics.json").exists():
            return "a killed run left metrics.json (it looks finished)"
        # resume; pause it inside its final save, so that the next case kills it there
        proc, d = c.paused(config, "final:0", "final")
        state["proc"], state["dir"] = proc, d
        if f"resuming from {out / f'checkpoint-{SAVE_STEPS}'}" not in (d / "stderr.txt").read_text():
            return f"the rerun did not resume from checkpoint-{SAVE_STEPS}"
        last = out / f"checkpoint-{MAX_STEPS}"
        if not last.is_dir():
            return f"no checkpoint-{MAX_STEPS} after the resume"
        return weight_difference(last, ref_out / f"checkpoint-{MAX_STEPS}")

    def during_final_save() -> str | None:
        proc = state.get("proc")
        if proc is None:
            raise CaseFailed("the resumed run never reached its final save")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if (out / "metrics.json").exists():
            return "a run killed in its final save left metrics.json"
        again = c.ft("run", config, timeout=400)
        if problem := ok(again):
            return f"the rerun failed: {problem}"
        steps, logged = steps_of(out)
        beyond = sorted(p.name for p in out.glob("checkpoint-*") if int(p.name.split("-")[1]) > MAX_STEPS)
        leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith(".ft-tmp"))
        problems = []
        if steps != MAX_STEPS or max(logged) != MAX_STEPS:
            problems.append(f"steps {steps}, last logged step {max(logged)} (max_steps {MAX_STEPS})")
        if beyond or leftovers:
            problems.append(f"left {beyond + leftovers}")
        if f"resuming from {out / f'checkpoint-{MAX_STEPS}'}" not in again.stderr + again.stdout:
            problems.append("the rerun did not say it resumed from the last checkpoint")
        if diff := weight_difference(out, ref_out):
            problems.append(diff)
        return "; ".join(problems) or None

    c.case("kill9", f"{method}: kill -9 at step 3 of {MAX_STEPS}, resume from checkpoint-{SAVE_STEPS}",
           during_training)
    c.case("kill9", f"{method}: kill -9 inside the final save, rerun", during_final_save)
    if state.get("proc") is not None and state["proc"].poll() is None:
        state["proc"].kill()


# -- bad preference data and rewards --------------------------------------------------------------------


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_PAIR = {"prompt": "What is 3 plus 4?", "chosen": "The result is 7.", "rejected": "The result is 8."}

REWARDS_PLUGIN = '''
import time

import numpy as np

from ft.api import hookimpl


@hookimpl
def ft_register_rewards(register):
    def all_none(prompts, completions, **kwargs):
        return [None] * len(completions)

    def raises(prompts, completions, **kwargs):
        return [1 / 0 for _ in completions]

    def wrong_length(prompts, completions, **kwargs):
        return [1.0]

    def text_scores(prompts, completions, **kwargs):
        return ["good" for _ in completions]

    def slow(prompts, completions, **kwargs):
        time.sleep(60)
        return [0.0] * len(completions)

    def as_numpy(prompts, completions, **kwargs):
        return np.array([float(len(c)) for c in completions])

    for fn in (all_none, raises, wrong_length, text_scores, slow, as_numpy):
        register.add(fn.__name__, fn)
'''


def first_text(c: Campaign, prepared: Path) -> str:
    """The first prepared row's first token column, decoded (what the model is trained on)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(c.model)
    for key in prepared.rglob("key.json"):
        for sub in [key.parent, *sorted(p for p in key.parent.rglob("*") if p.is_dir())]:
            try:
                rows = load_from_disk(str(sub))
            except Exception:  # not a saved dataset: look further down
                continue
            split = rows["train"] if hasattr(rows, "keys") else rows
            column = next(n for n in split.column_names if "input_ids" in n)
            return tok.decode(split[0][column])
    raise CaseFailed(f"no prepared rows under {prepared}")


def bad_data(c: Campaign) -> None:
    root = c.work / "bad_data"
    root.mkdir()

    def preprocess(name: str, rows: list[Any], method: str = "dpo", kind: str = "preference",
                   entry: dict | None = None, **overrides: Any) -> tuple[subprocess.CompletedProcess, Path]:
        data = jsonl(root / f"{name}.jsonl", rows)
        config = c.method_config(method, root / name, datasets=[{"path": str(data), "type": kind, **(entry or {})}],
                                 dataset_prepared_path=str(root / name / "prepared"), **overrides)
        return c.ft("preprocess", config, timeout=180), data

    def refused(name: str, rows: list[Any], *fragments: str, **kw: Any) -> Callable[[], str | None]:
        def check() -> str | None:
            result, data = preprocess(name, rows, **kw)
            return ft_error(result, str(data.name), *fragments)
        return check

    def dropped(name: str, rows: list[Any], *fragments: str, **kw: Any) -> Callable[[], str | None]:
        """Bad rows among good ones: dropped and counted (the message says why), or refused, never silent."""
        def check() -> str | None:
            result, data = preprocess(name, rows, **kw)
            if result.returncode == 2:
                return ft_error(result, str(data.name))
            if problem := ok(result):
                return problem
            output = result.stdout + result.stderr
            bad_line = f"{data.name}:{len(rows)}"  # the bad row is the last one
            missing = [f for f in (*fragments, "dropped 1", bad_line) if f not in output]
            return f"dropped silently? the output lacks {missing}: {tail(output)}" if missing else None
        return check

    good = [GOOD_PAIR] * 6
    c.case("bad_data", "a pair without 'rejected'", dropped("no_rejected", good + [{"prompt": "x", "chosen": "y"}],
                                                            "rejected"))
    c.case("bad_data", "chosen equals rejected", dropped(
        "same_sides", good + [{"prompt": "x", "chosen": "same", "rejected": "same"}], "chosen equals rejected"))
    c.case("bad_data", "truncation makes both sides equal (excess_length: truncate)", dropped(
        "truncated_same", good + [{"prompt": "Say it.", "chosen": "word " * 200 + "yes", "rejected": "word " * 200 + "no"}],
        "chosen equals rejected", excess_length="truncate", sequence_len=64))
    c.case("bad_data", "a line that is not a JSON object", dropped("not_object", good + ["[1, 2, 3]"], "malformed"))
    c.case("bad_data", "a line that is not JSON", dropped("not_json", good + ['{"prompt": "x", "chosen'], "malformed"))
    c.case("bad_data", "an empty preference file", refused("empty", []))
    c.case("bad_data", "chosen is a number, not text or messages", dropped(
        "number_side", good + [{"prompt": "x", "chosen": 7, "rejected": "y"}], "'chosen' is a int"))

    def ultrafeedback() -> str | None:  # prompt + whole conversations: the user turn must not be rendered twice
        conv = lambda answer: [{"role": "user", "content": "What is 3 plus 4?"},  # noqa: E731
                               {"role": "assistant", "content": answer}]
        rows = [{"prompt": "What is 3 plus 4?", "chosen": conv("The result is 7."),
                 "rejected": conv("The result is 8.")}] * 6
        result, data = preprocess("ultrafeedback", rows)
        if result.returncode == 2:
            return ft_error(result, data.name)
        if problem := ok(result):
            return problem
        text = first_text(c, root / "ultrafeedback" / "prepared")
        count = text.count("What is 3 plus 4?")
        return None if count == 1 else f"the user turn is rendered {count} times: {text!r}"

    c.case("bad_data", "UltraFeedback shape (prompt + whole conversations)", ultrafeedback)

    def kto_intel() -> str | None:
        rows = [{"system": "You add numbers.", "question": "What is 3 plus 4?", "chosen": "The result is 7.",
                 "rejected": "The result is 8."}] * 6
        result, _ = preprocess("kto_intel", rows, method="kto", kind="kto")
        if problem := ok(result):
            return problem
        output = result.stdout + result.stderr
        if "samples kept 12 " not in output and "(12 samples" not in output:  # built now, or read from the cache
            return f"expected 12 KTO rows from 6 pairs: {tail(output)}"
        text = first_text(c, root / "kto_intel" / "prepared")
        return None if "You add numbers." in text else f"the system message is lost: {text!r}"

    c.case("bad_data", "KTO on the chatml.intel shape (system, question)", kto_intel)
    c.case("bad_data", "field_messages on a preference entry is accepted", lambda: ok(preprocess(
        "field_messages", [{"conversation": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}] * 6,
        entry={"field_messages": "conversation"})[0]))
    c.case("bad_data", "reward model margin that is not a number", dropped(
        "bad_margin", [{**GOOD_PAIR, "margin": 1.0}] * 6 + [{**GOOD_PAIR, "margin": "high"}], "'margin' must be a number",
        method="reward_model", entry={"field_margin": "margin"}))

    plugin = root / "rewards_plugin.py"
    plugin.write_text(REWARDS_PLUGIN)

    def reward_run(name: str, reward: dict, *fragments: str, code: int = 2, **grpo: Any) -> Callable[[], str | None]:
        def check() -> str | None:
            config = c.method_config("grpo", root / f"reward-{name}", max_steps=2, save_steps=None,
                                     grpo={"num_generations": 4, "max_completion_len": 8, "beta": 0.0,
                                           "rewards": [reward], **grpo})
            result = c.ft("run", config, "-p", plugin, timeout=240)
            if code == 0:
                return ok(result)
            return ft_error(result, *fragments, code=code)
        return check

    c.case("bad_data", "a reward that returns None for every completion", reward_run("none", {"name": "all_none"},
                                                                                     "all_none"))
    c.case("bad_data", "a reward that raises", reward_run("raises", {"name": "raises"}, "raises", "ZeroDivisionError"))
    c.case("bad_data", "a reward that returns the wrong number of scores", reward_run("length", {"name": "wrong_length"},
                                                                                      "wrong_length"))
    c.case("bad_data", "a reward that returns text", reward_run("text", {"name": "text_scores"}, "text_scores"))
    c.case("bad_data", "a reward slower than grpo.reward_timeout", reward_run("slow", {"name": "slow"}, "slow",
                                                                              "reward_timeout", reward_timeout=2))
    c.case("bad_data", "a reward that returns a numpy array works", reward_run("numpy", {"name": "as_numpy"}, code=0))
    c.case("bad_data", "an unknown reward name", reward_run("unknown", {"name": "no_such_reward"}, "no_such_reward"))
    c.case("bad_data", "an option a built-in reward does not take", reward_run(
        "option", {"name": "regex_match", "pattern": "\\d", "patern": "x"}, "patern"))


# -- hostile configs ----------------------------------------------------------------------------------------


def hostile_config(c: Campaign) -> None:
    root = c.work / "hostile"
    root.mkdir()
    head = f"base_model: {c.model}\ndatasets:\n  - path: {TINY / 'chat.jsonl'}\n    type: chat_template\n" \
           f"output_dir: {root / 'out'}\ndataset_prepared_path: {root / 'prepared'}\n"
    bomb = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]  # 9**9 values
    files = {
        "alias_bomb": (head + "\n".join(bomb) + "\n").encode(),
        "huge": (head + ("# " + "x" * 98 + "\n") * 520_000).encode(),  # 52 MB, the size
        "non_utf8": (head + "lr_scheduler: café\n").encode("latin-1"),
        "deep_nesting": (head + "lr_scheduler_kwargs: {x: " + "[" * 5000 + "]" * 5000 + "}\n").encode(),
    }
    fragments = {"alias_bomb": "alias", "huge": "bytes", "non_utf8": "UTF-8", "deep_nesting": "nests deeper"}
    for name, content in files.items():
        path = root / f"{name}.yaml"
        path.write_bytes(content)
        for command in ("validate", "run", "preprocess", "convert"):
            c.case("hostile_config", f"{name}: ft {command}",
                   lambda command=command, path=path, name=name: ft_error(
                       c.ft(command, path, timeout=60), str(path), fragments[name]))
    c.case("hostile_config", "/dev/zero as the config: ft validate", lambda: ft_error(
        c.ft("validate", "/dev/zero", timeout=60), "/dev/zero", "bytes"))
    plain = root / "plain.yaml"
    plain.write_text(head)
    c.case("hostile_config", "a deeply nested --set value", lambda: ft_error(
        c.ft("validate", plain, "--set", "seed=" + "[" * 5000 + "]" * 5000, timeout=60), "--set", "nests deeper"))
    c.case("hostile_config", "an alias bomb in a --set value", lambda: ft_error(
        c.ft("validate", plain, "--set", "lr_scheduler_kwargs=" + "{" + ", ".join(bomb).replace(": ", ": ") + "}",
             timeout=60), "--set"))


# -- secrets --------------------------------------------------------------------------------------------------

SECRET_PLUGIN = '''
from pydantic import BaseModel, ConfigDict

from ft.api import hookimpl


class Vault(BaseModel):
    model_config = ConfigDict(extra="forbid")
    endpoint: str = ""
    request_header: str = ""
    mirror: str = ""
    signed_url: str = ""
    callback: str = ""
    headers: dict = {}


@hookimpl
def ft_add_config(registry):
    registry.add("vault", Vault)


@hookimpl
def ft_register_formats(register):
    from ft_plugins.chat_template import ChatTemplateOptions, build_chat_tokenize

    class Options(ChatTemplateOptions):  # a format that fetches something would hold such options
        api_url: str = ""
        authorization: str = ""

    register.add("chat_with_secrets", Options, build_chat_tokenize)
'''

SECRETS = {
    "query token": "https://api.example.invalid/v1?access_token=qs-tok-8f8f8f&sig=qs-sig-9a9a9a",
    "signed URL": "https://b.example.invalid/d.jsonl?X-Amz-Date=2026&X-Amz-Signature=amzsig-6c6c6c",
    "Bearer header": "Authorization: Bearer bearer-7e7e7e",
    "user:pass@ URL": "https://mirror-user:url-pass-4b4b4b@example.invalid/models",
}
SECRET_PARTS = {"query token": ["qs-tok-8f8f8f", "qs-sig-9a9a9a"], "signed URL": ["amzsig-6c6c6c"],
                "Bearer header": ["bearer-7e7e7e"], "user:pass@ URL": ["url-pass-4b4b4b"],
                "HF_ENDPOINT credentials": ["hub-secret-3c3c"], "HF_TOKEN": ["hf_envtoken_5e5e5e"],
                "--set query token": ["set-tok-1a1a1a"], "dataset entry tokens": ["ds-tok-2b2b2b", "ds-bearer-3c3c3c"],
                "headers mapping": ["map-bearer-4d4d4d"]}


def secrets(c: Campaign) -> None:
    root = c.work / "secrets"
    plugin = root / "vault_plugin.py"
    root.mkdir()
    plugin.write_text(SECRET_PLUGIN)
    usable = c.ft("plugins", "-p", plugin, timeout=120)
    fmt = "chat_with_secrets" if "chat_with_secrets" in usable.stdout + usable.stderr else None
    entry: dict[str, Any] = {"path": str(TINY / "chat.jsonl"), "type": fmt or "chat_template"}
    if fmt:
        entry.update(api_url="https://d.example.invalid/x?token=ds-tok-2b2b2b",
                     authorization="Bearer ds-bearer-3c3c3c")
    config = c.method_config("sft", root, datasets=[entry], max_steps=2, save_steps=1,
                             dataset_prepared_path=str(root / "prepared"),
                             vault={"endpoint": SECRETS["query token"], "request_header": SECRETS["Bearer header"],
                                    "mirror": SECRETS["user:pass@ URL"], "signed_url": SECRETS["signed URL"],
                                    "headers": {"Authorization": "Bearer map-bearer-4d4d4d"}},
                             hub={"model_id": "someone/tiny", "strategy": "end"})
    env = {"HF_ENDPOINT": "http://hubuser:hub-secret-3c3c@127.0.0.1:9", "HF_TOKEN": "hf_envtoken_5e5e5e",
           "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    result = c.ft("run", config, "-p", plugin, "-v", "--set",
                  "vault.callback=https://s.example.invalid/f?token=set-tok-1a1a1a", timeout=400, env=env)
    out = root / "out"
    files = [p for d in (out, root / "prepared") if d.exists() for p in d.rglob("*") if p.is_file()]
    written = {p: p.read_bytes() for p in files}

    def ran() -> str | None:
        output = result.stdout + result.stderr
        if "Traceback" in output:
            return f"a traceback: {tail(output)}"
        problems = []
        if not (out / "checkpoint-1" / "ft_config.yaml").is_file():
            problems.append("no checkpoint-1/ft_config.yaml to check")
        if not list((root / "prepared").rglob("key.json")):
            problems.append("no cache key.json to check")
        if not fmt:
            problems.append("the format plugin with secret options did not register")
        saved = (out / "ft_config.yaml").read_text() if (out / "ft_config.yaml").is_file() else ""
        keys = "".join(p.read_text() for p in (root / "prepared").rglob("key.json"))
        redacted = {"ft_config.yaml": (saved, ["access_token=***&sig=***", "Authorization: Bearer ***",
                                                "mirror-user:***@", "X-Amz-Signature=***", "f?token=***",
                                                "Authorization: '***'", "x?token=***"]),
                    "key.json": (keys, ["x?token=***", '"authorization": "***"'])}
        for where, (text, marks) in redacted.items():  # the secrets did go in: their redacted forms are there
            if missing := [m for m in marks if m not in text]:
                problems.append(f"{where} lacks the redacted {missing}")
        if result.returncode == 0:
            problems.append("the hub push to a closed port did not fail")
        elif "hubuser:***@127.0.0.1" not in output:
            problems.append(f"the hub error does not name the redacted endpoint: {tail(output)}")
        return "; ".join(problems) or None

    c.case("secrets", "the run with secrets everywhere wrote its files (checkpoint, cache) and failed at the hub",
           ran)
    output = result.stdout + result.stderr
    for name, parts in SECRET_PARTS.items():
        def check(parts=parts) -> str | None:
            leaks = [f"{s} in {p.relative_to(root)}" for p, content in written.items() for s in parts
                     if s.encode() in content]
            leaks += [f"{s} in the run's output" for s in parts if s in output]
            return "; ".join(leaks) or None
        c.case("secrets", f"{name}: absent from every written file and the logs", check)

    def config_error() -> str | None:  # a validation error next to a secret must not print it
        bad = c.method_config("sft", root / "bad", learning_rate="fast",
                              vault={"endpoint": SECRETS["query token"], "request_header": SECRETS["Bearer header"]})
        result = c.ft("validate", bad, "-p", plugin, timeout=120)
        if problem := ft_error(result, "learning_rate"):
            return problem
        leaked = [s for s in ("qs-tok-8f8f8f", "bearer-7e7e7e") if s in result.stdout + result.stderr]
        return f"printed {leaked}" if leaked else None

    c.case("secrets", "a config error next to secrets does not print them", config_error)


# -- merge / overwrite / convert onto existing paths ---------------------------------------------------------


AXOLOTL = """base_model: {model}
datasets:
  - path: {data}
    type: chat_template
sequence_len: 128
micro_batch_size: 2
num_epochs: 1
learning_rate: 0.001
output_dir: ./out
"""


def paths(c: Campaign) -> None:
    root = c.work / "paths"
    full = c.method_config("sft", root / "full", max_steps=2, save_steps=None)
    lora = c.method_config("sft", root / "lora", max_steps=2, save_steps=None,
                           plugins=["lora"], lora={"r": 4, "alpha": 8, "target_modules": "all-linear"})
    full_out, lora_out = root / "full" / "out", root / "lora" / "out"
    for config in (full, lora):
        if problem := ok(c.ft("run", config, timeout=300)):
            c.case("paths", f"setup run {config.parent.name}", lambda problem=problem: problem)
            return

    def refused_untouched(target: Path, args: list[Any], *fragments: str) -> Callable[[], str | None]:
        def check() -> str | None:
            before = snapshot(target) if target.is_dir() else {"": target.read_bytes()}
            problem = ft_error(c.ft(*args, timeout=180), *fragments)
            if target.is_dir():
                changed = same_files(before, target)
            else:
                changed = None if target.read_bytes() == before[""] else f"{target.name} changed"
            return "; ".join(p for p in (problem, changed) if p) or None
        return check

    c.case("paths", "ft merge LORA --to FULL (a finished run)", refused_untouched(
        full_out, ["merge", lora_out, "--to", full_out], str(full_out), "--force"))
    merged = root / "merged"
    c.case("paths", "ft merge LORA --to NEW writes a model", lambda: ok(c.ft("merge", lora_out, "--to", merged)) or (
        None if (merged / "model.safetensors").is_file() else "no model.safetensors"))
    c.case("paths", "ft merge LORA --to NEW again (it holds a model)", refused_untouched(
        merged, ["merge", lora_out, "--to", merged], "--force"))
    c.case("paths", "ft merge LORA --to LORA (the run itself)", refused_untouched(
        lora_out, ["merge", lora_out, "--to", lora_out], "own directory"))
    truncated = root / "truncated"
    shutil.copytree(lora_out, truncated)
    adapter = next(truncated.glob("adapter_model.safetensors"), None)

    def merge_truncated() -> str | None:
        if adapter is None:
            return f"no adapter_model.safetensors in {sorted(p.name for p in lora_out.iterdir())}"
        adapter.write_bytes(adapter.read_bytes()[:200])
        return ft_error(c.ft("merge", truncated, "--to", root / "merged-truncated", timeout=180), "adapter_model")

    c.case("paths", "ft merge of a truncated adapter", merge_truncated)
    c.case("paths", "ft run FULL again (finished) without --overwrite", refused_untouched(
        full_out, ["run", full], "--overwrite"))

    def overwrite_fails_early() -> str | None:
        before = snapshot(full_out)
        result = c.ft("run", full, "--overwrite", "--set", f"datasets.0.path={root / 'missing.jsonl'}")
        problems = [p for p in (ft_error(result, "missing.jsonl"), same_files(before, full_out)) if p]
        again = c.ft("run", full)
        if "already holds a finished run" not in again.stdout + again.stderr:
            problems.append(f"the next run does not see the finished run: {tail(again.stdout + again.stderr)}")
        return "; ".join(problems) or None

    c.case("paths", "ft run --overwrite whose new run fails at data loading", overwrite_fails_early)

    def overwrite_killed_before_saving() -> str | None:
        before = snapshot(full_out)
        proc, _ = c.paused(full, "step_end:1", "overwrite", "--overwrite")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        again = c.ft("run", full)
        problems = [p for p in (ft_error(again, "already holds a finished run"), same_files(before, full_out)) if p]
        return "; ".join(problems) or None

    c.case("paths", "ft run --overwrite killed (-9) before its first save", overwrite_killed_before_saving)

    source = root / "axolotl.yml"
    source.write_text(AXOLOTL.format(model=c.model, data=TINY / "chat.jsonl"))
    c.case("paths", "ft convert X -o X --force (its own input)", refused_untouched(
        source, ["convert", source, "-o", source, "--force"], str(source)))
    link = root / "link.yml"
    link.symlink_to(source)
    c.case("paths", "ft convert X -o LINK-TO-X --force", refused_untouched(
        source, ["convert", source, "-o", link, "--force"], str(source)))
    existing = root / "existing.yaml"
    existing.write_text("# someone's config\n")
    c.case("paths", "ft convert X -o EXISTING without --force", refused_untouched(
        existing, ["convert", source, "-o", existing], "--force"))
    c.case("paths", "ft convert X -o MISSING-FOLDER/out.yaml", lambda: ft_error(
        c.ft("convert", source, "-o", root / "no" / "such" / "out.yaml"), str(root / "no" / "such")))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--areas", default=",".join(AREAS), help=f"comma-separated, of {', '.join(AREAS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods for the kill9 area")
    parser.add_argument("--only", default="", help="run only the cases whose name holds one of these "
                        "comma-separated fragments (setup runs of the chosen areas still run)")
    parser.add_argument("--work", default=None, help="keep the runs here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    areas = [a for a in args.areas.split(",") if a]
    unknown = sorted(set(areas) - set(AREAS))
    if unknown:
        parser.error(f"unknown areas {unknown}; choose from {AREAS}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ft-fault-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)  # what libraries print while the campaign runs goes to stderr: stdout is the JSON alone
    try:
        c = Campaign(work, [part for part in args.only.split(",") if part])
        for area in areas:
            if area == "kill9":
                kill9(c, [m for m in args.methods.split(",") if m])
            else:
                globals()[area](c)
        summary = {**c.summary(), "seconds": round(time.monotonic() - start)}
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["held"] == result["tried"] else 1)
