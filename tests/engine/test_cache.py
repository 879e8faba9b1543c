"""The prepared-data cache: reused when nothing changed, rebuilt when anything that matters did.

Reuse is proved by counting calls of the format's tokenize function, not by a log line.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import test_data
from test_data import CALLS, QA_LOG, base_config, make_context, qa_rows, rows_of, write_lines

from ft.engine.data import prepare_datasets


def run(tmp_path, tokenizer, data, **extra):
    """Prepare with a fresh context (as a new `ft` process would) and count tokenize calls."""
    before = CALLS["tokenize"]
    cfg = base_config(tmp_path, data, **extra)
    if "entry" in extra:
        cfg["datasets"][0].update(cfg.pop("entry"))
    out = prepare_datasets(make_context(cfg), tokenizer)
    return out, CALLS["tokenize"] - before


@pytest.fixture
def data(tmp_path):
    return write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in qa_rows(10)])


def test_cache_is_reused_when_nothing_changed_and_rebuilt_after_a_data_edit(tmp_path, ft_tiny_tokenizer, data):
    first, calls = run(tmp_path, ft_tiny_tokenizer, data)
    assert calls > 0 and first.stats["cache"] == "built"

    second, calls = run(tmp_path, ft_tiny_tokenizer, data)
    assert calls == 0 and second.stats["cache"] == "hit"
    assert second.cache_dir == first.cache_dir and rows_of(second.train) == rows_of(first.train)

    original = data.read_text()
    data.write_text(original.replace("The result is 4.", "The result is four."))  # same size class, new content
    third, calls = run(tmp_path, ft_tiny_tokenizer, data)
    assert calls > 0 and third.cache_dir != first.cache_dir
    assert any("four" in ft_tiny_tokenizer.decode(r["input_ids"]) for r in rows_of(third.train))

    data.write_text(original)  # back to the first content: its cache is still there
    fourth, calls = run(tmp_path, ft_tiny_tokenizer, data)
    assert calls == 0 and fourth.cache_dir == first.cache_dir


def test_touching_a_file_without_changing_it_keeps_the_cache(tmp_path, ft_tiny_tokenizer, data):
    run(tmp_path, ft_tiny_tokenizer, data)
    os.utime(data, (1, 1))
    _, calls = run(tmp_path, ft_tiny_tokenizer, data)
    assert calls == 0


def test_settings_that_change_the_rows_rebuild_and_others_do_not(tmp_path, ft_tiny_tokenizer, data):
    run(tmp_path, ft_tiny_tokenizer, data)
    _, calls = run(tmp_path, ft_tiny_tokenizer, data, learning_rate=1e-3, micro_batch_size=4)
    assert calls == 0
    for change in ({"sequence_len": 48}, {"train_on_inputs": True}, {"seed": 7}, {"val_set_size": 0.2},
                   {"excess_length": "truncate"}, {"entry": {"prompt_field": "prompt", "split": "other"}}):
        _, calls = run(tmp_path, ft_tiny_tokenizer, data, **copy.deepcopy(change))
        assert calls > 0, f"{change} should rebuild"


def test_a_changed_tokenizer_or_chat_template_rebuilds(tmp_path, ft_tiny_tokenizer, data):
    run(tmp_path, ft_tiny_tokenizer, data)
    tok = copy.deepcopy(ft_tiny_tokenizer)
    tok.chat_template = ft_tiny_tokenizer.chat_template + "{# edited #}"
    _, calls = run(tmp_path, tok, data)
    assert calls > 0
    tok2 = copy.deepcopy(ft_tiny_tokenizer)
    tok2.add_tokens(["<new_token>"])
    _, calls = run(tmp_path, tok2, data)
    assert calls > 0
    _, calls = run(tmp_path, copy.deepcopy(ft_tiny_tokenizer), data)  # an equal copy: reused
    assert calls == 0


def test_editing_a_file_named_by_a_dataset_option_rebuilds(tmp_path, ft_tiny_tokenizer, data):
    prefix = tmp_path / "prefix.txt"
    prefix.write_text("Q: ")
    first, calls = run(tmp_path, ft_tiny_tokenizer, data, entry={"prefix_file": str(prefix)})
    assert calls > 0
    _, calls = run(tmp_path, ft_tiny_tokenizer, data, entry={"prefix_file": str(prefix)})
    assert calls == 0
    prefix.write_text("Question: ")
    second, calls = run(tmp_path, ft_tiny_tokenizer, data, entry={"prefix_file": str(prefix)})
    assert calls > 0 and ft_tiny_tokenizer.decode(second.train[0]["input_ids"]).startswith("Question: ")


def test_a_full_disk_while_writing_says_so_and_leaves_no_cache_behind(tmp_path, ft_tiny_tokenizer, data, monkeypatch):
    import errno

    from ft.engine import cache
    from ft.engine.failures import DiskFullError

    def boom(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    real = cache.store

    def crashing_store(root, key, inputs, train, *args):
        monkeypatch.setattr(type(train), "save_to_disk", boom)
        try:
            return real(root, key, inputs, train, *args)
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(cache, "store", crashing_store)
    with pytest.raises(DiskFullError) as err:
        run(tmp_path, ft_tiny_tokenizer, data)
    monkeypatch.undo()
    prepared = tmp_path / "prepared"
    message = str(err.value)
    assert message.startswith(f"no space left on device at {prepared} while writing the prepared data"), message
    assert "dataset_prepared_path" in message and "run the same command again" in message
    assert [p.name for p in prepared.iterdir() if not p.name.endswith(".lock")] == []

    out, calls = run(tmp_path, ft_tiny_tokenizer, data)
    assert calls > 0 and len(out.train) == 10


def test_a_damaged_cache_is_rebuilt(tmp_path, ft_tiny_tokenizer, data):
    import shutil

    first, _ = run(tmp_path, ft_tiny_tokenizer, data)
    shutil.rmtree(Path(first.cache_dir) / "train")
    second, calls = run(tmp_path, ft_tiny_tokenizer, data)
    assert calls > 0 and len(second.train) == 10


def _prepare_in_child(config: dict, model_dir: str, log_file: str, out_file: str, local_rank: str = "0",
                      delay: float = 0.0) -> None:
    import time

    from transformers import AutoTokenizer

    os.environ["LOCAL_RANK"] = local_rank
    time.sleep(delay)
    QA_LOG["file"], QA_LOG["delay"] = log_file, 1.0
    out = prepare_datasets(make_context(config), AutoTokenizer.from_pretrained(model_dir))
    Path(out_file).write_text(json.dumps({"dir": out.cache_dir, "n": len(out.train), "cache": out.stats["cache"]}))


def test_concurrent_processes_build_once_and_both_load(tmp_path, ft_tiny_model_dir, data):
    log_file = tmp_path / "calls.log"
    config = base_config(tmp_path, data)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_prepare_in_child, args=(config, str(ft_tiny_model_dir), str(log_file),
                                                        str(tmp_path / f"out{i}.json"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    builders = set(log_file.read_text().split())
    assert len(builders) == 1  # the tokenize function ran in one process only
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert outs[0]["dir"] == outs[1]["dir"] and outs[0]["n"] == outs[1]["n"] == 10
    assert sorted(o["cache"] for o in outs) == ["built", "hit"]


def test_the_key_inputs_are_written_next_to_the_cache(tmp_path, ft_tiny_tokenizer, data):
    out, _ = run(tmp_path, ft_tiny_tokenizer, data)
    inputs = json.loads((Path(out.cache_dir) / "key.json").read_text())
    assert inputs["config"]["sequence_len"] == 64
    assert "sources" in inputs["entries"]["datasets"][0]["fingerprints"]
    assert set(inputs["plugins"]) == {"qa_test_format", "sources"}  # not every installed format plugin
    assert inputs["entries"]["datasets"][0]["format_source"]


def test_local_rank_0_builds_while_the_other_ranks_wait(tmp_path, ft_tiny_model_dir, data):
    log_file = tmp_path / "calls.log"
    config = base_config(tmp_path, data)
    ctx = mp.get_context("fork")
    # rank 1 arrives first; rank 0 only after 1.5 s, yet rank 0 is the one that tokenizes
    procs = [ctx.Process(target=_prepare_in_child, args=(config, str(ft_tiny_model_dir), str(log_file),
                                                        str(tmp_path / f"out{rank}.json"), str(rank), delay))
             for rank, delay in ((1, 0.0), (0, 1.5))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    outs = {rank: json.loads((tmp_path / f"out{rank}.json").read_text()) for rank in (0, 1)}
    assert outs[0]["cache"] == "built" and outs[1]["cache"] == "hit"
    assert set(log_file.read_text().split()) == {str(procs[1].pid)}


def test_installing_an_unrelated_format_plugin_keeps_the_cache(tmp_path, ft_tiny_tokenizer, data):
    from ft import hookimpl
    from ft.tools.testing import registered_plugin

    class OtherFormat:
        @hookimpl
        def ft_register_formats(self, register):
            register.add("other_format", test_data.QAOptions, test_data.build_qa)

    run(tmp_path, ft_tiny_tokenizer, data)
    with registered_plugin(OtherFormat(), "other_format_plugin"):
        _, calls = run(tmp_path, ft_tiny_tokenizer, data)
    assert calls == 0


class TokenQAOptions(test_data.QAOptions):
    api_token: str = ""  # a format that fetches something would hold one
    mirror: str = ""


class TokenQA:
    @staticmethod
    @test_data.hookimpl
    def ft_register_formats(register):
        register.add("qa_token", TokenQAOptions, test_data.build_qa)


def test_the_cache_key_file_holds_no_secret(tmp_path, ft_tiny_tokenizer, data):
    from ft.kernel.context import load_context

    cfg = base_config(tmp_path, data)
    cfg["datasets"][0].update(type="qa_token", api_token="tok-cache-5c5c5c",
                              mirror="https://me:pw-cache-6d6d6d@example.invalid/x")
    prepared = prepare_datasets(load_context(cfg, extra_plugins=[("qa_token", TokenQA)]), ft_tiny_tokenizer)
    written = [p.read_text(errors="replace") for p in Path(prepared.cache_dir).rglob("*.json")]
    assert any('"api_token": "***"' in text for text in written), "key.json shows that a token was set"
    assert not [t for t in written if "tok-cache-5c5c5c" in t or "pw-cache-6d6d6d" in t]


def test_a_damaged_cache_file_is_noticed_and_rebuilt(tmp_path, ft_tiny_tokenizer, data, caplog):
    first, _ = run(tmp_path, ft_tiny_tokenizer, data)
    want = rows_of(first.train)
    arrow = next(Path(first.cache_dir, "train").glob("*.arrow"))
    blob = bytearray(arrow.read_bytes())
    middle = len(blob) // 2
    blob[middle:middle + 8] = bytes(b ^ 0xFF for b in blob[middle:middle + 8])  # same size, other content
    arrow.write_bytes(bytes(blob))

    with caplog.at_level(logging.WARNING, logger="ft"):
        again, calls = run(tmp_path, ft_tiny_tokenizer, data)
    assert calls > 0 and again.stats["cache"] == "built", "the damaged cache was not used"
    assert f"{arrow.relative_to(first.cache_dir)} changed since it was written" in caplog.text, caplog.text
    assert rows_of(again.train) == want


class BigIdFormat:
    """A buggy format: the last token id is one past the tokenizer's vocabulary."""

    @staticmethod
    @test_data.hookimpl
    def ft_register_formats(register):
        def build(cfg, entry, tokenizer):
            qa = test_data.build_qa(cfg, entry, tokenizer)

            def tokenize(rows):
                out = qa(rows)
                for sample in out:
                    if isinstance(sample, dict):
                        sample["input_ids"][-1] = len(tokenizer)
                return out

            return tokenize

        register.add("qa_big_ids", test_data.QAOptions, build)


def test_token_ids_outside_the_vocabulary_are_an_error_at_preparation(tmp_path, ft_tiny_tokenizer, data):
    from ft.kernel.context import load_context
    from ft.kernel.errors import DataError

    cfg = base_config(tmp_path, data)
    cfg["datasets"][0]["type"] = "qa_big_ids"
    with pytest.raises(DataError) as err:
        prepare_datasets(load_context(cfg, extra_plugins=[("qa_big_ids", BigIdFormat)]), ft_tiny_tokenizer)
    message = str(err.value)
    assert f"token id {len(ft_tiny_tokenizer)}" in message and f"{len(ft_tiny_tokenizer)} tokens" in message, message
