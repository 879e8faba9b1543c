"""Test helpers for ft plugin authors, shipped as a pytest plugin (entry point ``pytest11``).

Installing ft makes these fixtures available in any project's tests (``-p no:ft`` turns them off):

- ``ft_tiny_model_dir``: a tiny random Llama model + ChatML tokenizer directory, made offline
  once per session (what ``base_model:`` points at). ``ft_tiny_tokenizer`` loads its tokenizer.
- ``ft_dataset``: writes rows (or sample rows of a known shape) to a JSONL file.
- ``ft_config``: writes a small, fast config (tiny model, 2 steps) with your overrides.
- ``ft_runner``: runs ``ft run`` / ``ft preprocess`` / ``ft validate`` (or any ``ft`` command)
  in-process and returns an :class:`FtResult` (exit code, output, output dir, exception).
- ``ft_hook_recorder``: records every hook implementation call made while the test runs.
- ``ft_register_plugin``: registers a plugin object for the rest of the test.
- ``ft_one_torch_thread``: torch on one intra-op thread for the test (tiny models train many times
  faster so on a busy CI box); use it with ``pytest.mark.usefixtures("ft_one_torch_thread")``.

The same tools are plain functions and classes for use outside fixtures:
:func:`registered_plugin` (a context manager), :class:`HookRecorder`, :class:`FtRunner`.
:func:`assert_patch_survives` checks that a kernel plugin's patch survives ``model.train()`` and runs in a
training step. :func:`install_distribution` writes plugin modules as an installed distribution (dist-info and
``[ft]`` entry points) for a subprocess that should find them as it finds pip-installed ones.

This module is imported by pytest in every project that installs ft, so it imports neither
torch nor transformers at import time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "FtResult",
    "FtRunner",
    "HookCall",
    "HookRecorder",
    "assert_patch_survives",
    "install_distribution",
    "make_rows",
    "registered_plugin",
    "write_config",
    "write_dataset",
]


# ---------------------------------------------------------------------------------------------
# registering a plugin for one test
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def registered_plugin(obj: object, name: str | None = None) -> Iterator[str]:
    """Register ``obj`` (a module, class or instance with ``@hookimpl`` functions) as a plugin.

    Every plugin manager made inside the ``with`` block (so every ``ft`` command run in-process)
    loads it after the installed entry points. Its declaration ``PLUGIN = ft.api.Plugin(feature=True)`` makes it
    a feature, active only when selected with ``-p NAME`` or ``plugins: [NAME]``. Yields the name.
    """
    from ft.kernel.plugins import add_process_plugin, process_plugin_names, remove_process_plugin

    name = name or _default_name(obj)
    if name in process_plugin_names():
        raise ValueError(f"a plugin named '{name}' is already registered for this process; pass another name=")
    add_process_plugin(name, obj)
    try:
        yield name
    finally:
        remove_process_plugin(name)


def _default_name(obj: object) -> str:
    name = getattr(obj, "__name__", None) or type(obj).__name__
    return str(name).rsplit(".", 1)[-1]


# ---------------------------------------------------------------------------------------------
# recording hook calls
# ---------------------------------------------------------------------------------------------


@dataclass
class HookCall:
    """One call of one plugin's implementation of a hook."""

    hook: str
    plugin: str
    kwargs: dict[str, Any]
    result: Any = None
    exception: BaseException | None = None


class HookRecorder:
    """Records every hook call of the plugin managers made while it is active.

    ft calls each hook through pluggy, one plugin at a time, so the recorder (a pluggy hook-call
    monitor) sees every call the core makes -- pipeline hooks, registration hooks and merged
    ones alike -- with the plugin that answered, its arguments, result or exception. Use it as a
    context manager or through the ``ft_hook_recorder`` fixture.
    """

    def __init__(self) -> None:
        self.calls: list[HookCall] = []
        self._stop: Any = None

    # -- queries -----------------------------------------------------------------------------

    def hooks(self) -> list[str]:
        """Hook names in the order they were first called."""
        return list(dict.fromkeys(c.hook for c in self.calls))

    def calls_to(self, hook: str) -> list[HookCall]:
        _check_hook_name(hook)
        return [c for c in self.calls if c.hook == hook]

    def plugins_called(self, hook: str) -> list[str]:
        """Plugin names whose implementation of ``hook`` ran, in call order (repeats kept)."""
        return [c.plugin for c in self.calls_to(hook)]

    def called(self, hook: str, plugin: str | None = None) -> bool:
        return any(plugin is None or c.plugin == plugin for c in self.calls_to(hook))

    def results(self, hook: str, plugin: str | None = None) -> list[Any]:
        return [c.result for c in self.calls_to(hook) if plugin is None or c.plugin == plugin]

    def clear(self) -> None:
        self.calls.clear()

    # -- activation --------------------------------------------------------------------------

    def __enter__(self) -> HookRecorder:
        from ft.kernel.hooks import is_firstresult_hook
        from ft.kernel.plugins import add_hook_monitor

        if self._stop is not None:
            raise RuntimeError("this HookRecorder is already recording")
        recorder = self
        active = [True]

        def before(hook_name: str, hook_impls: Sequence[Any], kwargs: dict[str, Any]) -> None:
            pass

        def after(outcome: Any, hook_name: str, hook_impls: Sequence[Any], kwargs: dict[str, Any]) -> None:
            if not active[0] or not hook_name.startswith("ft_"):
                return
            plugins = [i.plugin_name for i in reversed(hook_impls) if not (i.hookwrapper or i.wrapper)]
            call = HookCall(hook_name, plugins[0] if len(plugins) == 1 else ",".join(plugins), dict(kwargs))
            if outcome.exception is not None:
                call.exception = outcome.exception
            else:
                result = outcome.get_result()
                call.result = result if is_firstresult_hook(hook_name) else (result[0] if result else None)
            recorder.calls.append(call)

        remove = add_hook_monitor(before, after)

        def stop() -> None:
            active[0] = False
            remove()

        self._stop = stop
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._stop is not None
        self._stop()
        self._stop = None


def _check_hook_name(hook: str) -> None:
    from ft.kernel.hooks import hook_names

    if hook not in hook_names():
        raise ValueError(f"unknown hook '{hook}'. Hooks: {', '.join(hook_names())}.")


# ---------------------------------------------------------------------------------------------
# running the CLI in-process
# ---------------------------------------------------------------------------------------------


@dataclass
class FtResult:
    """What an in-process ``ft`` command did."""

    args: list[str]
    exit_code: int
    output: str  # stdout and stderr, interleaved as the user would see them
    stdout: str
    stderr: str
    log: str = ""  # what ft logged (INFO and up): drop reports, patches, progress lines
    exception: BaseException | None = None  # an unexpected exception (not a clean exit)
    traceback: str = ""
    output_dir: Path | None = None  # the run's output_dir (from the config and --set overrides)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.exception is None

    def assert_ok(self) -> FtResult:
        """Fail the test with the command's output and traceback unless it succeeded."""
        if not self.ok:
            raise AssertionError(
                f"`ft {' '.join(self.args)}` exited with {self.exit_code}\n--- output ---\n{self.output}"
                + (f"\n--- log ---\n{self.log}" if self.log else "")
                + (f"\n--- traceback ---\n{self.traceback}" if self.traceback else "")
            )
        return self

    def assert_error(self, *fragments: str) -> FtResult:
        """Fail unless the command failed cleanly (an ft error, no traceback) mentioning every fragment."""
        if self.ok:
            raise AssertionError(f"`ft {' '.join(self.args)}` succeeded, but an error was expected:\n{self.output}")
        if self.exception is not None:
            raise AssertionError(
                f"`ft {' '.join(self.args)}` crashed instead of reporting an error:\n{self.traceback}"
            )
        missing = [f for f in fragments if f not in self.output]
        if missing:
            raise AssertionError(f"error output lacks {missing!r}:\n{self.output}\n--- log ---\n{self.log}")
        return self

    def json(self) -> Any:
        """The standard output parsed as JSON (``ft plugins --json``)."""
        return json.loads(self.stdout)


class FtRunner:
    """Runs ``ft`` commands in this process with click's ``CliRunner``.

    Plugins registered with :func:`registered_plugin` and hook recorders see these runs, which
    a subprocess would not.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env or {}

    def invoke(self, *args: str | Path) -> FtResult:
        """Run ``ft ARGS...``; never raises for a failing command (check ``exit_code``)."""
        import io

        from click.testing import CliRunner

        from ft.cli import cli

        str_args = [str(a) for a in args]
        root, ft_logger = logging.getLogger(), logging.getLogger("ft")
        root_handlers, root_level, ft_level = list(root.handlers), root.level, ft_logger.level
        log_stream = io.StringIO()
        log_handler = logging.StreamHandler(log_stream)
        log_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ft_logger.addHandler(log_handler)
        ft_logger.setLevel(logging.DEBUG if {"-v", "--verbose"} & set(str_args) else logging.INFO)
        # Plugin commands (ft_add_commands) are added to the global group once per process; start
        # from the core commands so this run sees the plugins registered now, and restore after.
        saved_commands, saved_flag = dict(cli.commands), cli.__dict__.get("_plugins_added")
        cli.commands = {n: c for n, c in cli.commands.items() if _is_core_command(c)}
        cli._plugins_added = False  # type: ignore[attr-defined]
        try:
            result = CliRunner().invoke(cli, str_args, env=self.env, catch_exceptions=True)
        finally:
            cli.commands = saved_commands
            if saved_flag is None:
                cli.__dict__.pop("_plugins_added", None)
            else:
                cli._plugins_added = saved_flag  # type: ignore[attr-defined]
            ft_logger.removeHandler(log_handler)
            ft_logger.setLevel(ft_level)
            # `ft run` calls logging.basicConfig, which may bind a handler to CliRunner's
            # temporary stream; drop it so later logging does not write to a closed file.
            for h in root.handlers[:]:
                if h not in root_handlers:
                    root.removeHandler(h)
            root.setLevel(root_level)
        exc = result.exception
        if isinstance(exc, SystemExit):
            exc = None
        tb = "".join(traceback.format_exception(*result.exc_info)) if exc is not None and result.exc_info else ""
        try:
            stderr = result.stderr
        except ValueError:  # click < 8.2 without a separate stderr
            stderr = ""
        return FtResult(str_args, result.exit_code, result.output, result.stdout, stderr, log_stream.getvalue(),
                        exc, tb)

    def run(self, config: str | Path, *args: str) -> FtResult:
        """``ft run CONFIG ARGS...``; ``output_dir`` is set on the result."""
        return self._with_config("run", config, args)

    def preprocess(self, config: str | Path, *args: str) -> FtResult:
        return self._with_config("preprocess", config, args)

    def validate(self, config: str | Path, *args: str) -> FtResult:
        return self._with_config("validate", config, args)

    def plugins(self, *args: str) -> FtResult:
        return self.invoke("plugins", *args)

    def _with_config(self, command: str, config: str | Path, args: Sequence[str]) -> FtResult:
        result = self.invoke(command, config, *args)
        result.output_dir = _output_dir_of(Path(config), args)
        return result


def _is_core_command(command: Any) -> bool:
    return getattr(getattr(command, "callback", None), "__module__", "") == "ft.cli"


def _output_dir_of(config: Path, args: Sequence[str]) -> Path | None:
    """The output_dir the config (with ``--set`` overrides) names, resolved like ``ft`` does."""
    from ft.kernel.config_file import apply_overrides, read_yaml
    from ft.kernel.errors import FtError

    overrides = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
    overrides += [a.split("=", 1)[1] for a in args if a.startswith("--set=")]
    try:
        data = apply_overrides(read_yaml(config).data, overrides)
    except FtError:
        return None
    return Path(str(data.get("output_dir") or "./out"))


# ---------------------------------------------------------------------------------------------
# tiny datasets and configs
# ---------------------------------------------------------------------------------------------


def make_rows(kind: str = "chat", n: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """Sample rows of a known shape: ``chat`` (OpenAI ``messages``), ``alpaca`` or ``completion``."""
    if kind == "chat":
        from ft.tools.tiny import make_chat_rows

        return make_chat_rows(n, seed=seed)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if kind == "alpaca":
            rows.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"The result is {a + b}."})
        elif kind == "completion":
            rows.append({"text": f"The sum of {a} and {b} is {a + b}. " * rng.randint(1, 3)})
        else:
            raise ValueError(f"unknown row kind '{kind}'; use chat, alpaca or completion")
    return rows


def write_dataset(path: str | Path, rows: list[dict[str, Any]] | None = None, *, kind: str = "chat",
                  n: int = 16, seed: int = 0) -> Path:
    """Write ``rows`` (default: :func:`make_rows`) as JSON lines; returns the path."""
    from ft.tools.tiny import write_jsonl

    return write_jsonl(path, rows if rows is not None else make_rows(kind, n, seed))


FAST_DEFAULTS: dict[str, Any] = {
    "sequence_len": 128,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1.0e-3,
    "max_steps": 2,
    "logging_steps": 1,
    "dataset_num_proc": 1,
    "bf16": False,
    "seed": 0,
}


def write_config(path: str | Path, *, base_model: str | Path, datasets: list[dict[str, Any]] | None = None,
                 dataset: str | Path | None = None, **overrides: Any) -> Path:
    """Write a small, fast config (2 steps, short sequences) for ``ft run``; keys in ``overrides`` win.

    ``dataset`` is a shortcut for ``datasets: [{path: DATASET, type: chat_template}]``. The output and
    prepared-data directories default to siblings of the config file.
    """
    import yaml

    p = Path(path)
    if datasets is None:
        if dataset is None:
            raise ValueError("write_config needs `dataset=` (a chat JSONL path) or `datasets=` (entries)")
        datasets = [{"path": str(dataset), "type": "chat_template"}]
    data: dict[str, Any] = {
        "base_model": str(base_model),
        "datasets": datasets,
        **FAST_DEFAULTS,
        "output_dir": str(p.parent / "out"),
        "dataset_prepared_path": str(p.parent / "prepared"),
    }
    data.update(overrides)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return p


def install_distribution(site: str | Path, name: str, version: str, modules: dict[str, str],
                         entry_points: dict[str, str]) -> dict[str, str]:
    """Install plugin modules into directory ``site`` as distribution ``name`` (without pip).

    ``modules`` maps module names to their source (dedented here); ``entry_points`` maps plugin
    names to modules (the ``[ft]`` group). Returns a copy of the environment with ``site`` first on
    ``PYTHONPATH`` and plugin autoloading on: a subprocess run with it discovers the plugins
    through ``importlib.metadata``, exactly as pip-installed ones.
    """
    import os
    import textwrap

    site = Path(site)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    for module, code in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(code), encoding="utf-8")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[ft]\n" + "".join(f"{plugin} = {module}\n" for plugin, module in entry_points.items()), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("FT_DISABLE_PLUGIN_AUTOLOAD", None)
    return env


# ---------------------------------------------------------------------------------------------
# kernel patches
# ---------------------------------------------------------------------------------------------


def assert_patch_survives(model: Any, patch: Any, *, plugin: str = "plugin", inputs: dict[str, Any] | None = None,
                          steps: int = 2) -> list[Any]:
    """Apply ``patch(model)`` as ft does, train as the Trainer does, and fail unless the patch ran.

    ``patch`` is what your ``ft_patch_model`` does (it returns a list of ``PatchRecord`` or None).
    ft's own watch (``ft.engine.patch_watch.PatchWatch``) then notes every ``forward`` it bound on a module
    instance and every module it swapped in. Each of ``steps`` training steps switches the model to
    ``train()`` (after an ``eval()`` from the second step on, as an evaluation does), runs a forward
    and backward pass with labels (``inputs``, default: random token ids), and fails with an
    ``AssertionError`` naming each change that was undone or never called, or each record whose
    ``check`` failed. It also fails when the patch changed nothing that can be checked. Global
    records are undone before it returns; it returns the records.

    Load ``model`` as ft does (``use_kernels=False``) to test the plugin under ft, and with
    transformers' defaults to show that the patch also survives transformers' hub kernels.
    """
    import torch

    from ft.engine.patch_watch import PatchWatch, describe_problems

    watch = PatchWatch(model)
    records = list(patch(model) or [])
    try:
        changes = watch.add(plugin, records)
        if not changes and not any(r.check for r in records):
            raise AssertionError(f"{plugin}: the patch changed no module of the model (no bound forward, no swapped "
                                 "module) and returned no record with a check, so nothing shows that it runs")
        if inputs is None:
            device = next(model.parameters()).device
            ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
            inputs = {"input_ids": ids.to(device), "labels": ids.to(device)}
        for step in range(1, steps + 1):
            if step > 1:
                model.eval()
            model.train()
            for change in watch.changes:  # count this step's calls only
                change.calls = 0
                if change.counter is not None:
                    change.counter.calls = 0
            model(**inputs).loss.backward()
            problems = watch.problems()
            if problems:
                header = f"after training step {step}, {len(problems)} patch(es) were not in effect:"
                raise AssertionError(describe_problems(header, problems, watch.hints()))
        model.zero_grad(set_to_none=True)
    finally:
        watch.close()
        for record in reversed(records):
            if record.undo:
                record.undo()
    return records


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ft_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model + ChatML tokenizer (eos ``<|im_end|>``, no pad token), made offline once."""
    from ft.tools.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ft-tiny-model"))


@pytest.fixture(scope="session")
def ft_tiny_tokenizer(ft_tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ft_tiny_model_dir)


@pytest.fixture
def ft_one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test, restored after. A tiny model trains many times
    faster on one thread, above all on a busy 2-core CI box (two threads spin-wait for each other).
    Use it with ``pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def ft_dataset(tmp_path: Path):
    """``ft_dataset(rows=None, name="train.jsonl", kind="chat", n=16, seed=0) -> Path``."""

    def write(rows: list[dict[str, Any]] | None = None, name: str = "train.jsonl", **kwargs: Any) -> Path:
        return write_dataset(tmp_path / "data" / name, rows, **kwargs)

    return write


@pytest.fixture
def ft_config(tmp_path: Path, request: pytest.FixtureRequest):
    """``ft_config(dataset=PATH | datasets=[...], name="config.yaml", **overrides) -> Path``.

    ``base_model`` defaults to ``ft_tiny_model_dir`` (made on first use, so a test that passes its
    own ``base_model`` to only validate a config never imports torch).
    """

    def write(name: str = "config.yaml", **kwargs: Any) -> Path:
        if "base_model" not in kwargs:
            kwargs["base_model"] = request.getfixturevalue("ft_tiny_model_dir")
        return write_config(tmp_path / name, **kwargs)

    return write


@pytest.fixture
def ft_runner(monkeypatch: pytest.MonkeyPatch) -> FtRunner:
    """Runs ``ft`` commands in-process: ``ft_runner.run(config, "-p", "lora")`` -> :class:`FtResult`."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("WANDB_MODE", "disabled")):
        monkeypatch.setenv(key, value)
    return FtRunner()


@pytest.fixture
def ft_hook_recorder() -> Iterator[HookRecorder]:
    """Records the hook calls of every plugin manager made during the test."""
    with HookRecorder() as recorder:
        yield recorder


@pytest.fixture
def ft_register_plugin():
    """``ft_register_plugin(obj, name=None) -> name``: a plugin for the rest of this test."""
    with contextlib.ExitStack() as stack:

        def register(obj: object, name: str | None = None) -> str:
            return stack.enter_context(registered_plugin(obj, name))

        yield register
