"""The pipeline in run.py: global patches are undone when the run ends, whatever happens."""

from __future__ import annotations

import types

import pytest

from ft import hookimpl
from ft.api import Plugin
from ft.kernel.errors import FtError
from ft.kernel.patching import PatchRecord, patch_attribute
from ft.tools.testing import registered_plugin

TARGET = types.SimpleNamespace(kernel="original")


class GlobalPatcher:
    PLUGIN = Plugin(feature=True)

    @hookimpl(tryfirst=True)
    def ft_patch_model(self, cfg, model):
        return [patch_attribute(TARGET, "kernel", "patched", plugin="globalpatcher")]


class RefusingPatcher:
    PLUGIN = Plugin(feature=True)

    @hookimpl(trylast=True)
    def ft_patch_model(self, cfg, model):
        assert TARGET.kernel == "patched", "runs after GlobalPatcher"
        raise FtError("refusing: this model is not supported")


class Recorder:
    PLUGIN = Plugin(feature=True)
    seen: list = []

    @hookimpl
    def ft_before_train(self, cfg, trainer, model):
        Recorder.seen.append(TARGET.kernel)


def test_global_patch_is_undone_when_a_later_plugin_refuses(ft_config, ft_dataset, ft_runner):
    config = ft_config(dataset=ft_dataset(), max_steps=1)
    with registered_plugin(GlobalPatcher(), "globalpatcher"), registered_plugin(RefusingPatcher(), "refusing"):
        result = ft_runner.run(config, "-p", "globalpatcher", "-p", "refusing")
    result.assert_error("refusing: this model is not supported")
    assert TARGET.kernel == "original"


def test_global_patch_is_live_during_training_and_undone_after(ft_config, ft_dataset, ft_runner):
    config = ft_config(dataset=ft_dataset(), max_steps=1)
    Recorder.seen.clear()
    with registered_plugin(GlobalPatcher(), "globalpatcher"), registered_plugin(Recorder(), "recorder"):
        ft_runner.run(config, "-p", "globalpatcher", "-p", "recorder").assert_ok()
    assert Recorder.seen == ["patched"] and TARGET.kernel == "original"


def test_patch_record_describes_scope():
    rec = PatchRecord("p", "mod.fn", "fast_fn", undo=lambda: None)
    assert str(rec) == "[p] mod.fn -> fast_fn (global, undone at end of run)"
    assert str(PatchRecord("p", "model.norm", "FastNorm", count=3)) == "[p] model.norm x3 -> FastNorm (instance)"


def test_patch_attribute_restores_absent_attributes():
    ns = types.SimpleNamespace()
    rec = patch_attribute(ns, "new", 1, plugin="p")
    assert ns.new == 1
    rec.undo()
    assert not hasattr(ns, "new")
    with pytest.raises(AttributeError):
        ns.new  # noqa: B018


def test_a_misspelled_run_option_is_a_type_error_not_ignored(tmp_path):
    """``run(config, frsh=True)`` used to be accepted silently (``**options``) and start no fresh run."""
    from ft.run import run, train

    with pytest.raises(TypeError, match="frsh"):
        run({"base_model": "x", "datasets": []}, frsh=True)
    with pytest.raises(TypeError, match="overwite"):
        train(None, overwite=True)
