"""Streaming datasets (``streaming: true``): read, tokenized and packed as training consumes them, never cached."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from ft.kernel.errors import ConfigError, DataError
from ft.tools.testing import write_config

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")

WORDS = "the cat sat on a mat and ran far away over green hills while birds sang".split()


def texts(n: int, seed: int = 0, longest: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, longest))) + f" {i}" for i in range(n)]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(300)), encoding="utf-8")
    return path


def config(tmp_path: Path, model: Path, data: Path | str, streaming: bool = True, **extra) -> dict:
    return {
        "base_model": str(model),
        "datasets": [{"path": str(data), "type": "completion", "streaming": streaming}],
        "sequence_len": 64, "max_steps": 4, "micro_batch_size": 2, "learning_rate": 1.0e-3, "bf16": False,
        "dataset_prepared_path": str(tmp_path / "prepared"), "output_dir": str(tmp_path / "out"),
        "dataset_num_proc": 1, "logging_steps": 1, "seed": 3, **extra,
    }


def prepared(cfg: dict, tokenizer, plugin_args=()):
    from ft.engine.data import prepare_datasets
    from ft.kernel.context import load_context

    return prepare_datasets(load_context(cfg, plugin_args), tokenizer)


# -- the same rows as a cached build ----------------------------------------------------------------


@pytest.mark.parametrize("plugins", [["packing"], []], ids=["packed", "unpacked"])
def test_streamed_rows_equal_the_rows_of_a_cached_build(tmp_path, ft_tiny_model_dir, ft_tiny_tokenizer, corpus, plugins):
    """Same text, same tokenizer: a stream whose packing window holds every sample gives exactly the rows (input_ids,
    labels, position_ids) the cached build gives, packed by the same plugin."""
    cached = prepared(config(tmp_path, ft_tiny_model_dir, corpus, streaming=False, shuffle=False, plugins=plugins),
                      ft_tiny_tokenizer)
    streamed = prepared(config(tmp_path, ft_tiny_model_dir, corpus, shuffle=False, plugins=plugins), ft_tiny_tokenizer)
    rows = list(streamed.train)
    assert rows == cached.train.to_list()
    assert len(rows) > 100 and (not plugins or all(len(r["position_ids"]) == len(r["input_ids"]) for r in rows))
    assert streamed.stats["streaming"] and streamed.cache_dir == ""
    assert not (tmp_path / "prepared" / "streamed").exists()


def test_a_window_smaller_than_the_data_packs_window_by_window(tmp_path, ft_tiny_model_dir, ft_tiny_tokenizer, corpus,
                                                               monkeypatch):
    """Every token of every document arrives once, in bins of at most sequence_len with positions restarting
    at each sample, however small the packing window."""
    from ft.engine import data_stream

    monkeypatch.setattr(data_stream, "PACK_WINDOW_SAMPLES", 20)
    monkeypatch.setattr(data_stream, "READ_BATCH_ROWS", 7)
    cached = prepared(config(tmp_path, ft_tiny_model_dir, corpus, streaming=False, shuffle=False), ft_tiny_tokenizer)
    streamed = prepared(config(tmp_path, ft_tiny_model_dir, corpus, shuffle=False, plugins=["packing"]),
                        ft_tiny_tokenizer)
    rows = list(streamed.train)
    assert all(len(r["input_ids"]) <= 64 for r in rows)

    def samples(rows, packed):
        out = []
        for r in rows:
            starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] if packed else [0]
            ends = [*starts[1:], len(r["input_ids"])]
            out += [tuple(r["input_ids"][a:b]) for a, b in zip(starts, ends, strict=True)]
        return sorted(out)

    assert samples(rows, True) == samples(cached.train.to_list(), False)


# -- nothing is read whole ---------------------------------------------------------------------------

READ = {"rows": 0}
CORPUS_ROWS = 1_000_000


def endless_corpus():
    """A million documents; a reader that tried to read them all would be stopped here."""
    for i in range(CORPUS_ROWS):
        READ["rows"] += 1
        if READ["rows"] > 20_000:
            raise AssertionError("the stream was read far beyond what the steps need")
        yield {"text": f"document {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 40 + 3))}


def test_training_reads_only_the_rows_its_steps_need(tmp_path, ft_tiny_model_dir, monkeypatch, caplog):
    """3 steps of 2 packed rows from a million-document stream read a few windows of rows, and nothing is cached."""
    from datasets import IterableDataset

    from ft.engine import data_stream
    from ft.run import run

    READ["rows"] = 0
    monkeypatch.setattr(data_stream, "open_stream", lambda cfg, entry, where: IterableDataset.from_generator(endless_corpus))
    monkeypatch.setattr(data_stream, "PACK_WINDOW_SAMPLES", 64)
    monkeypatch.setattr(data_stream, "READ_BATCH_ROWS", 16)
    monkeypatch.setattr(data_stream, "SHUFFLE_BUFFER_ROWS", 32)
    with caplog.at_level("INFO", logger="ft"):
        result = run(config(tmp_path, ft_tiny_model_dir, "org/endless-corpus", max_steps=3, plugins=["packing"]))
    assert result.metrics["steps"] == 3 and result.metrics["train_tokens"] > 0
    # a window of 64 samples needs at most 64 rows (16 at a time) behind a 32-row shuffle buffer; 3 steps of
    # 2 bins fit in one window; the loader may start the next one
    assert 0 < READ["rows"] <= 2 * (64 + 16) + 32, READ["rows"]
    assert "nothing is cached" in caplog.text
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


# -- sources --------------------------------------------------------------------------------------


def test_text_parquet_and_directories_stream(tmp_path, ft_tiny_model_dir, ft_tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = texts(40, seed=1, longest=20)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("\n".join(docs[:20]) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"content": docs[20:]}), tmp_path / "b.parquet")
    (tmp_path / "dir" / "notes.md").write_text("not data", encoding="utf-8")

    def decoded(cfg):
        rows = list(prepared(cfg, ft_tiny_tokenizer).train)
        return sorted(ft_tiny_tokenizer.decode(r["input_ids"], skip_special_tokens=True).strip() for r in rows)

    assert decoded(config(tmp_path, ft_tiny_model_dir, tmp_path / "dir", sequence_len=128)) == sorted(docs[:20])
    cfg = config(tmp_path, ft_tiny_model_dir, tmp_path / "b.parquet", sequence_len=128)
    cfg["datasets"][0]["field"] = "content"
    assert decoded(cfg) == sorted(docs[20:])


def test_several_streamed_entries_take_turns(tmp_path, ft_tiny_model_dir, ft_tiny_tokenizer, monkeypatch):
    from ft.engine import data_stream

    monkeypatch.setattr(data_stream, "READ_BATCH_ROWS", 4)
    for name in ("left", "right"):
        (tmp_path / f"{name}.txt").write_text("".join(f"{name} {i}\n" for i in range(12)), encoding="utf-8")
    cfg = config(tmp_path, ft_tiny_model_dir, tmp_path / "left.txt", shuffle=False)
    cfg["datasets"].append({"path": str(tmp_path / "right.txt"), "type": "completion", "streaming": True})
    rows = list(prepared(cfg, ft_tiny_tokenizer).train)
    sides = [ft_tiny_tokenizer.decode(r["input_ids"], skip_special_tokens=True).split()[0] for r in rows]
    assert sides == (["left"] * 4 + ["right"] * 4) * 3  # batch by batch, every row once


def test_a_missing_file_and_a_bad_line_are_clear_errors(tmp_path, ft_tiny_model_dir, ft_tiny_tokenizer):
    with pytest.raises(DataError, match=r"datasets\[0\]\.path: file '\./nope\.jsonl' not found"):
        prepared(config(tmp_path, ft_tiny_model_dir, "./nope.jsonl"), ft_tiny_tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops\n', encoding="utf-8")
    data = prepared(config(tmp_path, ft_tiny_model_dir, bad), ft_tiny_tokenizer)
    with pytest.raises(DataError, match=r"datasets\[0\]\.path: reading the stream failed"):
        list(data.train)


def test_dropped_rows_are_counted_and_strict_stops_at_the_first(tmp_path, ft_tiny_model_dir, ft_tiny_tokenizer, caplog):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "one two"}\n{"body": "x"}\n{"text": "three four"}\n', encoding="utf-8")
    with caplog.at_level("INFO", logger="ft"):
        rows = list(prepared(config(tmp_path, ft_tiny_model_dir, data, shuffle=False), ft_tiny_tokenizer).train)
    assert len(rows) == 2
    assert "missing field 'text'" in caplog.text and "(streamed): row 2" in caplog.text
    assert "ended after 3 rows (dropped: 1 missing field 'text')" in caplog.text
    with pytest.raises(DataError, match=r"\(streamed\): row 2: missing field 'text'.*strict: true"):
        list(prepared(config(tmp_path, ft_tiny_model_dir, data, shuffle=False, strict=True), ft_tiny_tokenizer).train)


# -- the config ---------------------------------------------------------------------------------------


def test_config_errors_name_the_file_line_and_key(tmp_path, corpus):
    from ft.kernel.context import load_context

    base = {"path": str(corpus), "type": "completion", "streaming": True}
    path = write_config(tmp_path / "c.yaml", base_model="org/model", datasets=[base], max_steps=None)
    with pytest.raises(ConfigError) as err:
        load_context(path)
    assert f"{path}:5: datasets[0].streaming: a streaming dataset has no length" in str(err.value)
    assert "set max_steps: N" in str(err.value)

    path = write_config(tmp_path / "c.yaml", base_model="org/model", val_set_size=0.1,
                        datasets=[{**base, "weight": 2}, {"path": str(corpus), "type": "completion"}],
                        test_datasets=[base])
    with pytest.raises(ConfigError) as err:
        load_context(path)
    message = str(err.value)
    assert "datasets[1]: this entry is not streaming but datasets[0] is" in message
    assert "test_datasets[0].streaming: evaluation datasets are not streamed" in message
    assert "val_set_size: val_set_size holds rows out of the training data" in message
    assert "datasets[0].weight: weight is not supported with streaming" in message


def test_a_method_with_other_rows_is_refused(tmp_path, ft_tiny_model_dir, ft_tiny_tokenizer, corpus):
    cfg = config(tmp_path, ft_tiny_model_dir, corpus, method="dpo")
    cfg["datasets"][0]["type"] = "preference"
    with pytest.raises(DataError, match="method 'dpo' reads rows of chosen_input_ids.*Remove streaming: true"):
        prepared(cfg, ft_tiny_tokenizer)


# -- training -----------------------------------------------------------------------------------------


def test_an_evaluation_set_stays_in_memory_beside_a_streamed_training_set(tmp_path, ft_tiny_model_dir, corpus):
    from ft.run import run

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(8, seed=9)), encoding="utf-8")
    cfg = config(tmp_path, ft_tiny_model_dir, corpus, max_steps=2, plugins=["packing"], eval_steps=2,
                 test_datasets=[{"path": str(held), "type": "completion"}])
    result = run(cfg)
    assert result.metrics["eval_loss"] is not None and result.metrics["steps"] == 2


def weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(directory.glob("*.safetensors"))))


def test_a_resumed_run_continues_the_stream_and_ends_with_the_same_weights(tmp_path, ft_tiny_model_dir, corpus):
    """A run that crashed after checkpoint-2 of 4 resumes there: steps 3 and 4 train on the stream's batches 3 and 4 (the Trainer skips the
    batches already trained on), so the weights equal the uninterrupted run's; re-reading from the start would not."""
    import torch

    from ft.run import run

    steps = {"max_steps": 4, "save_steps": 2, "plugins": ["packing"], "learning_rate": 5.0e-3}
    whole = run(config(tmp_path / "whole", ft_tiny_model_dir, corpus, **steps))
    cfg = config(tmp_path / "cut", ft_tiny_model_dir, corpus, **steps)
    run(cfg)
    out = Path(cfg["output_dir"])
    shutil.rmtree(out / "checkpoint-4")  # as a crash during step 3 or 4 leaves it
    for name in ("model.safetensors", "metrics.json"):
        (out / name).unlink()
    start = weights(out / "checkpoint-2")
    resumed = run(cfg)
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-2") and resumed.metrics["steps"] == 4
    ref, got = weights(Path(whole.output_dir)), weights(out)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(start[n], ref[n]) for n in ref), "steps 3-4 changed the weights"


def test_preprocess_debug_shows_the_first_streamed_rows(tmp_path, ft_tiny_model_dir, corpus, ft_runner):
    path = write_config(tmp_path / "c.yaml", base_model=ft_tiny_model_dir, sequence_len=64, plugins=["packing"],
                        datasets=[{"path": str(corpus), "type": "completion", "streaming": True}])
    result = ft_runner.preprocess(path, "--debug", "2").assert_ok()
    assert "a streamed dataset; showing its first 2 rows" in result.output
    assert result.output.count("--- bin ") == 2 and "nothing is cached" in result.log
    assert not (tmp_path / "prepared").exists()
