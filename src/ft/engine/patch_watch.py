"""Checking what kernel plugins changed: every patch a plugin reported (and every instance change it did not)
must have run by the end of the first training step, or the run stops naming the plugin."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ft.kernel.errors import FtError
from ft.kernel.patching import PatchRecord

log = logging.getLogger("ft")


class CountingForward:
    """Stands in for a ``forward`` a plugin bound on a module instance and counts its calls.

    A callable object rather than a closure so that ``copy.deepcopy`` of the model (a frozen
    reference model) copies it with the module, bound to the copy. ``__wrapped__`` makes
    ``inspect.signature`` report the wrapped forward's parameters.
    """

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.__wrapped__ = forward
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.__wrapped__(*args, **kwargs)


@dataclass
class WatchedChange:
    """One change a plugin made to the model instance: a bound ``forward`` or a swapped-in module."""

    plugin: str
    where: str  # "model.norm (LlamaRMSNorm).forward" or "model.norm (FastNorm), swapped in"
    module: Any
    forward: Any  # the module's instance forward right after the plugin (a CountingForward, or None)
    counter: CountingForward | None = None  # for a bound forward
    hook: Any = None  # for a swapped module: the forward pre-hook that counts its calls
    calls: int = 0

    def problem(self) -> str | None:
        """None when the change ran in the first training step, else what happened to it."""
        now = self.module.__dict__.get("forward")
        if self.counter is not None:
            if self.counter.calls:
                return None
            if now is not self.counter:
                return f"{self.where} was removed after the plugin bound it, so the plugin's code never ran"
            return f"{self.where} is in place but was never called during the training step"
        if now is not self.forward:
            return f"{self.where}: its forward was replaced after the plugin swapped it in, so its code never ran"
        if not self.calls:
            return f"{self.where} was never called during the training step"
        return None

    def hint(self) -> str | None:
        """Why a hub-kernel layer loses its patch, when this change is on one."""
        layer = getattr(type(self.module), "kernel_layer_name", None)
        if layer is None or self.module.__dict__.get("forward") is self.forward:
            return None
        return (f"{type(self.module).__name__} is a transformers hub-kernel layer ('{layer}'): with hub kernels on, "
                "transformers re-kernelizes it at every train()/eval() switch and drops a forward bound on the "
                "instance. ft loads models with them off unless `hf: {use_kernels: true}` (or another loader "
                "plugin turns them on).")


def describe_problems(header: str, problems: list[tuple[str, str]], hints: Iterable[str] = ()) -> str:
    """``header``, one line per ``(plugin, problem)``, then each distinct hint once."""
    lines = [header, *(f"  - plugin '{plugin}': {problem}" for plugin, problem in problems)]
    lines += [f"  {h}" for h in dict.fromkeys(hints)]
    return "\n".join(lines)


def _describe_module(path: str, module: Any) -> str:
    return f"{path} ({type(module).__name__})" if path else type(module).__name__


def _instance_state(model: Any) -> dict[str, tuple[Any, Any]]:
    """Each module path -> (the module, the ``forward`` bound on that instance or None)."""
    return {path: (module, module.__dict__.get("forward")) for path, module in model.named_modules()}


class PatchWatch:
    """What each kernel plugin changed, checked once after the first training step.

    Call :meth:`add` after each plugin's ``ft_patch_model``: it compares the model instance with
    what it was before that plugin, wraps every newly bound ``forward`` in a :class:`CountingForward`
    and puts a counting pre-hook on every swapped-in module. :meth:`verify` then raises one
    :class:`FtError` listing every patch that did not survive or never ran (and every record whose
    ``check`` failed); :meth:`close` takes the counters off again.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.changes: list[WatchedChange] = []
        self.records: list[PatchRecord] = []
        self.verified = False
        self._state = _instance_state(model) if hasattr(model, "named_modules") else {}

    def add(self, plugin: str, records: Iterable[PatchRecord] = ()) -> list[WatchedChange]:
        """Watch what ``plugin`` changed on the model since the last call, and its records' checks."""
        self.records.extend(records)
        if not hasattr(self.model, "named_modules"):
            return []
        new: list[WatchedChange] = []
        swapped: list[str] = []
        for path, (module, forward) in _instance_state(self.model).items():
            before = self._state.get(path)
            if before is None or before[0] is not module:
                if any(path.startswith(p + ".") for p in swapped):
                    continue  # inside a module the plugin swapped in: watched through that module
                swapped.append(path)
                new.append(self._watch_module(plugin, path, module, forward))
            elif forward is not None and forward is not before[1]:
                new.append(self._watch_forward(plugin, path, module, forward))
        self.changes.extend(new)
        self._state = _instance_state(self.model)
        return new

    def _watch_forward(self, plugin: str, path: str, module: Any, forward: Any) -> WatchedChange:
        counter = CountingForward(forward)
        module.forward = counter
        return WatchedChange(plugin, f"{_describe_module(path, module)}.forward", module, counter, counter=counter)

    def _watch_module(self, plugin: str, path: str, module: Any, forward: Any) -> WatchedChange:
        change = WatchedChange(plugin, f"{_describe_module(path, module)}, swapped in", module, forward)
        if forward is not None and not isinstance(forward, CountingForward):
            change.counter = CountingForward(forward)  # a new module with its own bound forward
            change.forward = module.forward = change.counter
            return change

        def count(*_: Any) -> None:
            change.calls += 1

        change.hook = module.register_forward_pre_hook(count)
        return change

    def problems(self) -> list[tuple[str, str]]:
        """``(plugin, what is wrong)`` for every patch that is not in effect."""
        found = [(c.plugin, p) for c in self.changes if (p := c.problem()) is not None]
        for record in self.records:
            if record.check is None:
                continue
            try:
                problem = record.check()
            except Exception as exc:  # a broken check is the plugin's bug: report it as such
                problem = f"its check of {record.target} failed: {type(exc).__name__}: {exc}"
            if problem:
                found.append((record.plugin, problem))
        return found

    def hints(self) -> list[str]:
        """Why patches on hub-kernel layers were dropped (one line per layer class)."""
        return [h for c in self.changes if c.problem() is not None and (h := c.hint()) is not None]

    def verify(self, step: int | None = None) -> None:
        """Raise an FtError naming each plugin whose patch did not survive.

        The counters stay on until :meth:`close` (at the end of the run): taking them off in the
        middle of training would make torch.compile recompile the model's graph.
        """
        problems = self.problems()
        self.verified = True
        when = f"training step {step}" if step is not None else "the first training step"
        if problems:
            plugins = sorted({p for p, _ in problems})
            header = (f"{len(problems)} kernel patch(es) were not in effect after {when}, so training would silently "
                      "run without them:")
            fix = (f"Fix the plugin (docs/writing-a-kernel-plugin.md: patches that survive model.train()), or run "
                   f"without it ({', '.join(f'-p no:{p}' for p in plugins)}).")
            raise FtError(describe_problems(header, problems, [*self.hints(), fix]))
        checked = len(self.changes) + sum(1 for r in self.records if r.check is not None)
        if checked:
            log.info("kernel patches: all %d checked patches were in effect after %s", checked, when)

    def close(self) -> None:
        """Take the counters off the model (one that other code wrapped since stays, and still works)."""
        for change in self.changes:
            if change.hook is not None:
                change.hook.remove()
                change.hook = None
            counter = change.counter
            if counter is not None and change.module.__dict__.get("forward") is counter:
                change.module.forward = counter.__wrapped__
