"""Data preparation: drop report with file:line, strict mode, excess_length, splits, parallelism.

A small test format ``qa`` (prompt -> completion) is registered here so these tests do not
depend on the first-party formats; ``test_cache``/``test_packing`` import it from this module.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from pydantic import Field

from ft import hookimpl
from ft.kernel.errors import DataError
from ft.kernel.formats import IGNORE_INDEX, DatasetOptions, Dropped

CALLS = {"tokenize": 0, "rows": 0}


class QAOptions(DatasetOptions):
    prompt_field: str = Field("prompt", description="Field holding the prompt.")
    prefix_file: str | None = Field(None, description="A text file whose content prefixes every prompt.")


class QATokenize:
    """Prompt (not trained unless train_on_inputs) + completion + eos (trained)."""

    def __init__(self, tokenizer, prompt_field: str, train_on_inputs: bool, log_file: str | None = None,
                 prefix: str = ""):
        self.tokenizer, self.prompt_field, self.train_on_inputs = tokenizer, prompt_field, train_on_inputs
        self.log_file, self.prefix = log_file, prefix

    def __call__(self, rows):
        CALLS["tokenize"] += 1
        CALLS["rows"] += len(rows)
        if self.log_file:
            import os
            import time

            with open(self.log_file, "a") as fh:
                fh.write(f"{os.getpid()}\n")
            time.sleep(QA_LOG["delay"])  # a slow build, so concurrent processes overlap
        out = []
        for row in rows:
            prompt, completion = row.get(self.prompt_field), row.get("completion")
            if prompt is None or completion is None:
                missing = self.prompt_field if prompt is None else "completion"
                out.append(Dropped("missing field", f"no '{missing}'"))
                continue
            if completion == "BOOM":
                raise ValueError("the format cannot handle BOOM")
            p = self.tokenizer.encode(self.prefix + prompt, add_special_tokens=False)
            c = self.tokenizer.encode(completion, add_special_tokens=False) if completion else []
            c = c + [self.tokenizer.eos_token_id] if completion != "" else []
            labels = (list(p) if self.train_on_inputs else [IGNORE_INDEX] * len(p)) + c
            out.append({"input_ids": p + c, "labels": labels})
        return out


def build_qa(cfg, entry, tokenizer):
    toi = entry.train_on_inputs if entry.train_on_inputs is not None else cfg.train_on_inputs
    prefix = Path(entry.prefix_file).read_text() if entry.prefix_file else ""
    return QATokenize(tokenizer, entry.prompt_field, toi, QA_LOG["file"], prefix)


QA_LOG: dict = {"file": None, "delay": 0.0}


class QAPlugin:
    @hookimpl
    def ft_register_formats(self, register):
        register.add("qa", QAOptions, build_qa)


def make_context(config: dict, plugin_args=()):
    from ft.kernel.context import load_context

    return load_context(config, plugin_args, extra_plugins=[("qa_test_format", QAPlugin())])


def base_config(tmp_path: Path, *files: Path, **extra) -> dict:
    cfg = {
        "base_model": str(tmp_path / "model"),
        "datasets": [{"path": str(f), "type": "qa"} for f in files],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "sequence_len": 64,
        "dataset_num_proc": 1,
    }
    cfg.update(extra)
    return cfg


def qa_rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "completion": f"The result is {2 * i}."} for i in range(start, start + n)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def prepare(tmp_path, tokenizer, *files, plugin_args=(), **extra):
    from ft.engine.data import prepare_datasets

    ctx = make_context(base_config(tmp_path, *files, **extra), plugin_args)
    return prepare_datasets(ctx, tokenizer)


def rows_of(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


# -- (c) malformed rows are reported with file and line; nothing else is lost ------------------


def test_malformed_jsonl_lines_are_reported_with_file_and_line_and_the_rest_kept(tmp_path, ft_tiny_tokenizer, caplog):
    good = [json.dumps(r) for r in qa_rows(6)]
    lines = [good[0], good[1], '{"prompt": "broken", "completion": ', good[2], "[1, 2, 3]", "",
             good[3], '{"completion": "no prompt here"}', good[4], good[5]]
    data = write_lines(tmp_path / "chat.jsonl", lines)
    with caplog.at_level(logging.INFO, logger="ft.data"):
        out = prepare(tmp_path, ft_tiny_tokenizer, data, shuffle=False)

    assert len(out.train) == 6  # every good row is kept, in file order
    decoded = [ft_tiny_tokenizer.decode(r["input_ids"]) for r in rows_of(out.train)]
    assert [d.split("?")[0] for d in decoded] == [f"What is {i} plus {i}" for i in range(6)]

    report = json.loads((Path(out.cache_dir) / "report.json").read_text())
    assert report["dropped_total"] == 3
    malformed = report["dropped"]["malformed"]
    assert malformed["count"] == 2
    assert [e["where"] for e in malformed["examples"]] == [f"{data}:3", f"{data}:5"]
    assert "invalid JSON" in malformed["examples"][0]["detail"]
    assert "expected a JSON object" in malformed["examples"][1]["detail"]
    assert report["dropped"]["missing field"]["examples"][0] == {"where": f"{data}:8", "detail": "no 'prompt'"}
    assert out.report == report
    assert f"{data}:3" in caplog.text and "dropped 2 (malformed)" in caplog.text
    assert out.stats["rows"] == 9 and out.stats["samples"] == 6  # the blank line is not a row


def test_strict_turns_any_drop_into_an_error_listing_it(tmp_path, ft_tiny_tokenizer):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in qa_rows(3)] + ["not json"])
    with pytest.raises(DataError) as err:
        prepare(tmp_path, ft_tiny_tokenizer, data, strict=True)
    assert "strict: true" in str(err.value) and f"{data}:4" in str(err.value)
    # non-strict builds the cache; strict must still refuse it when it finds the drops there
    prepare(tmp_path, ft_tiny_tokenizer, data)
    with pytest.raises(DataError, match=f"{data}:4"):
        prepare(tmp_path, ft_tiny_tokenizer, data, strict=True)


def test_nothing_to_train_and_empty_rows_are_dropped_with_reasons(tmp_path, ft_tiny_tokenizer):
    rows = qa_rows(2) + [{"prompt": "only a prompt", "completion": ""}]
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    out = prepare(tmp_path, ft_tiny_tokenizer, data)
    assert len(out.train) == 2
    assert out.report["dropped"]["nothing to train"]["examples"][0]["where"] == f"{data}:3"


def test_a_row_the_format_fails_on_is_named_with_file_and_line(tmp_path, ft_tiny_tokenizer):
    rows = qa_rows(3) + [{"prompt": "x", "completion": "BOOM"}]
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=rf"{data}:4: .*cannot handle BOOM"):
        prepare(tmp_path, ft_tiny_tokenizer, data)


class TypoTokenize(QATokenize):
    """The qa format with a bug: its samples carry ``key`` instead of ``labels`` (or labels as text)."""

    def __init__(self, tokenizer, key: str, as_text: bool = False):
        super().__init__(tokenizer, "prompt", False)
        self.key, self.as_text = key, as_text

    def __call__(self, rows):
        out = super().__call__(rows)
        for sample in out:
            labels = sample.pop("labels")
            sample[self.key] = [str(x) for x in labels] if self.as_text else labels
        return out


class TypoPlugin:
    @hookimpl
    def ft_register_formats(self, register):
        register.add("typo", DatasetOptions, lambda cfg, entry, tok: TypoTokenize(tok, "label"))
        register.add("text_labels", DatasetOptions, lambda cfg, entry, tok: TypoTokenize(tok, "labels", as_text=True))


def prepare_typo(tmp_path, tokenizer, data, fmt):
    from ft.engine.data import prepare_datasets
    from ft.kernel.context import load_context

    cfg = base_config(tmp_path, data)
    cfg["datasets"][0]["type"] = fmt
    ctx = load_context(cfg, extra_plugins=[("typo_formats", TypoPlugin())])
    return prepare_datasets(ctx, tokenizer)


def test_a_sample_without_the_method_columns_names_the_format_its_plugin_and_the_row(tmp_path, ft_tiny_tokenizer):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in qa_rows(3)])
    with pytest.raises(DataError) as err:
        prepare_typo(tmp_path, ft_tiny_tokenizer, data, "typo")
    assert str(err.value).startswith(
        f"{data}:1: the 'typo' format (plugin 'typo_formats') failed on this row: it returned a sample with the "
        "columns input_ids, label, but method 'sft' reads input_ids, labels (missing: labels).")
    assert not list((tmp_path / "prepared").glob("*/stats.json"))  # nothing cached


def test_token_columns_that_are_not_token_ids_are_an_error_naming_the_column(tmp_path, ft_tiny_tokenizer):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in qa_rows(3)])
    with pytest.raises(DataError) as err:
        prepare_typo(tmp_path, ft_tiny_tokenizer, data, "text_labels")
    assert f"{data}:1: the 'text_labels' format (plugin 'typo_formats') failed on this row: its 'labels' is not a " \
           "list of token ids" in str(err.value)


def test_zero_trained_tokens_is_an_error_not_a_statistic(tmp_path, ft_tiny_tokenizer, monkeypatch):
    from ft.engine.data_tokenize import Samples

    monkeypatch.setattr(Samples, "trained_tokens", lambda self: 0)  # what a format that masks everything gives
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in qa_rows(3)])
    with pytest.raises(DataError) as err:
        prepare(tmp_path, ft_tiny_tokenizer, data)
    assert "the training data has 3 samples but not one trained token: method 'sft' learns from its labels" \
        in str(err.value) and "'qa' (plugin 'qa_test_format')" in str(err.value)


# -- excess_length -------------------------------------------------------------------------


def long_rows() -> list[dict]:
    return [{"prompt": "hi", "completion": "short answer"},
            {"prompt": "hello " * 40, "completion": "long answer"},
            {"prompt": "hey", "completion": "another short answer"}]


def test_excess_length_drop_reports_each_long_sample(tmp_path, ft_tiny_tokenizer):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in long_rows()])
    out = prepare(tmp_path, ft_tiny_tokenizer, data, sequence_len=32, shuffle=False)
    assert len(out.train) == 2
    entry = out.report["dropped"]["longer than sequence_len"]
    assert entry["count"] == 1 and entry["examples"][0]["where"] == f"{data}:2"
    assert re.fullmatch(r"sample \d+ tokens \(prompt \d+ \+ completion \d+\) > sequence_len 32",
                        entry["examples"][0]["detail"]), entry["examples"][0]["detail"]


def test_excess_length_truncate_keeps_the_first_sequence_len_tokens(tmp_path, ft_tiny_tokenizer):
    rows = [{"prompt": "hi", "completion": "word " * 60}]
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    out = prepare(tmp_path, ft_tiny_tokenizer, data, sequence_len=32, excess_length="truncate")
    full = ft_tiny_tokenizer.encode("hi", add_special_tokens=False) + ft_tiny_tokenizer.encode("word " * 60, add_special_tokens=False)
    assert out.train[0]["input_ids"] == full[:32]
    assert len(out.train[0]["labels"]) == 32 and out.report["dropped_total"] == 0 and out.stats["truncated"] == 1


def test_excess_length_truncate_drops_a_sample_left_with_nothing_to_train(tmp_path, ft_tiny_tokenizer):
    rows = [{"prompt": "hello " * 40, "completion": "answer"}, {"prompt": "hi", "completion": "ok"}]
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    out = prepare(tmp_path, ft_tiny_tokenizer, data, sequence_len=16, excess_length="truncate")
    assert len(out.train) == 1
    [example] = out.report["dropped"]["nothing to train"]["examples"]
    assert example["where"] == f"{data}:1" and example["detail"].endswith("after truncation to sequence_len 16")
    # dropped, so not counted as truncated (and kept)
    assert out.report["truncated"] == out.stats["truncated"] == 0 and out.report["dropped_total"] == 1


def test_excess_length_error_lists_the_long_samples(tmp_path, ft_tiny_tokenizer):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in long_rows()])
    with pytest.raises(DataError) as err:
        prepare(tmp_path, ft_tiny_tokenizer, data, sequence_len=32, excess_length="error")
    assert f"{data}:2" in str(err.value) and "excess_length" in str(err.value)


# -- concatenation, shuffling, eval split -------------------------------------------------------


def test_concatenated_samples_keep_every_extra_column_with_none_where_a_part_lacks_it():
    import numpy as np

    from ft.engine.data_tokenize import Samples

    a = Samples({"input_ids": (np.array([1, 2, 3]), np.array([0, 2, 3]))}, np.array([0, 1]), {"weight": [0.5, 1.0]})
    b = Samples({"input_ids": (np.array([4]), np.array([0, 1]))}, np.array([2]), {"source": ["x"]})
    both = Samples.concat([a, b])
    assert both.extras == {"weight": [0.5, 1.0, None], "source": [None, None, "x"]}
    assert both.tokens["input_ids"][1].tolist() == [0, 2, 3, 4]


def test_datasets_are_concatenated_shuffled_with_the_seed_and_split(tmp_path, ft_tiny_tokenizer):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in qa_rows(20)])
    b = write_lines(tmp_path / "b.jsonl", [json.dumps(r) for r in qa_rows(20, start=100)])
    out = prepare(tmp_path, ft_tiny_tokenizer, a, b, val_set_size=0.25, seed=1)
    assert len(out.train) == 30 and len(out.eval) == 10
    train_ids = {tuple(r["input_ids"]) for r in rows_of(out.train)}
    eval_ids = {tuple(r["input_ids"]) for r in rows_of(out.eval)}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 40

    again = prepare(tmp_path / "other", ft_tiny_tokenizer, a, b, val_set_size=0.25, seed=1,
                    dataset_prepared_path=str(tmp_path / "p2"))
    assert rows_of(again.train) == rows_of(out.train)  # same seed, same order
    other_seed = prepare(tmp_path, ft_tiny_tokenizer, a, b, val_set_size=0.25, seed=2)
    assert [r["input_ids"] for r in rows_of(other_seed.train)] != [r["input_ids"] for r in rows_of(out.train)]

    count = prepare(tmp_path, ft_tiny_tokenizer, a, b, val_set_size=3)
    assert len(count.eval) == 3 and len(count.train) == 37

    ordered = prepare(tmp_path, ft_tiny_tokenizer, a, b, shuffle=False)
    first = ft_tiny_tokenizer.decode(ordered.train[0]["input_ids"])
    last = ft_tiny_tokenizer.decode(ordered.train[39]["input_ids"])
    assert first.startswith("What is 0 plus 0") and last.startswith("What is 119 plus 119")


def test_test_datasets_become_the_eval_set(tmp_path, ft_tiny_tokenizer):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in qa_rows(8)])
    t = write_lines(tmp_path / "t.jsonl", [json.dumps(r) for r in qa_rows(3, start=50)])
    out = prepare(tmp_path, ft_tiny_tokenizer, a, test_datasets=[{"path": str(t), "type": "qa"}])
    assert len(out.train) == 8 and len(out.eval) == 3
    assert out.eval.column_names == ["input_ids", "labels"] and not out.packed


def test_val_set_size_that_leaves_nothing_to_train_is_an_error(tmp_path, ft_tiny_tokenizer):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in qa_rows(4)])
    with pytest.raises(DataError, match="val_set_size"):
        prepare(tmp_path, ft_tiny_tokenizer, a, val_set_size=4)


def test_no_samples_left_is_an_error_with_the_reasons(tmp_path, ft_tiny_tokenizer):
    a = write_lines(tmp_path / "a.jsonl", ["oops", '{"prompt": "x"}'])
    with pytest.raises(DataError, match="no training samples") as err:
        prepare(tmp_path, ft_tiny_tokenizer, a)
    assert "malformed" in str(err.value) and "missing field" in str(err.value)


def test_labels_and_stats(tmp_path, ft_tiny_tokenizer):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in qa_rows(5)])
    out = prepare(tmp_path, ft_tiny_tokenizer, a, shuffle=False)
    row = out.train[0]
    prompt = ft_tiny_tokenizer.encode("What is 0 plus 0?", add_special_tokens=False)
    assert row["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert row["labels"][len(prompt):] == row["input_ids"][len(prompt):]
    assert row["labels"][-1] == ft_tiny_tokenizer.eos_token_id
    s = out.stats
    assert s["rows"] == 5 and s["samples"] == 5
    assert s["tokens"] == sum(len(r["input_ids"]) for r in rows_of(out.train))
    assert s["trained_tokens"] == sum(sum(x != IGNORE_INDEX for x in r["labels"]) for r in rows_of(out.train))
    assert json.loads((Path(out.cache_dir) / "stats.json").read_text())["tokens"] == s["tokens"]


# -- parallel tokenization ----------------------------------------------------------------------


def test_parallel_workers_give_the_same_result_as_one_process(tmp_path, ft_tiny_tokenizer, monkeypatch):
    from ft.engine import data_tokenize
    monkeypatch.setattr(data_tokenize, "INLINE_BELOW_ROWS", 0)
    rows = [json.dumps(r) for r in qa_rows(300)]
    rows[17] = "{bad"
    a = write_lines(tmp_path / "a.jsonl", rows)
    one = prepare(tmp_path, ft_tiny_tokenizer, a, dataset_num_proc=1, dataset_prepared_path=str(tmp_path / "p1"))
    two = prepare(tmp_path, ft_tiny_tokenizer, a, dataset_num_proc=2, dataset_prepared_path=str(tmp_path / "p2"))
    assert rows_of(one.train) == rows_of(two.train)
    assert one.report == two.report and two.report["dropped"]["malformed"]["examples"][0]["where"] == f"{a}:18"


def test_spawned_workers_where_fork_is_unavailable(tmp_path, ft_tiny_tokenizer, monkeypatch):
    from ft.engine import data_tokenize
    monkeypatch.setattr(data_tokenize, "INLINE_BELOW_ROWS", 0)
    monkeypatch.setattr(data_tokenize, "start_method", lambda: "spawn")
    rows = [json.dumps(r) for r in qa_rows(100)]
    rows[5] = '{"completion": "no prompt"}'
    a = write_lines(tmp_path / "a.jsonl", rows)
    one = prepare(tmp_path, ft_tiny_tokenizer, a, dataset_num_proc=1, dataset_prepared_path=str(tmp_path / "p1"))
    two = prepare(tmp_path, ft_tiny_tokenizer, a, dataset_num_proc=2, dataset_prepared_path=str(tmp_path / "p2"))
    assert rows_of(one.train) == rows_of(two.train) and len(two.train) == 99
    assert two.report["dropped"]["missing field"]["examples"][0]["where"] == f"{a}:6"


def test_parallel_worker_errors_name_the_row(tmp_path, ft_tiny_tokenizer, monkeypatch):
    from ft.engine import data_tokenize
    monkeypatch.setattr(data_tokenize, "INLINE_BELOW_ROWS", 0)
    rows = qa_rows(200)
    rows[150] = {"prompt": "x", "completion": "BOOM"}
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=rf"{a}:151"):
        prepare(tmp_path, ft_tiny_tokenizer, a, dataset_num_proc=2)


def test_raw_rows_address_rows_across_files():
    from ft.engine.data import RawRows, RowPart

    raw = RawRows("dir", [RowPart([{"a": 1}, {"a": 2}], "x.jsonl", [1, 3]), RowPart([{"a": 3}], "y.jsonl", [2])])
    assert len(raw) == 3
    assert raw.batch(1, 3) == [{"a": 2}, {"a": 3}]
    assert [raw.where(i) for i in range(3)] == ["x.jsonl:1", "x.jsonl:3", "y.jsonl:2"]
    assert RowPart([{}], "z.parquet").where(0) == "z.parquet: row 1"



# -- ft preprocess --debug ------------------------------------------------------------------------


def test_debug_view_marks_trained_text_without_colour_and_colours_it_on_a_terminal(tmp_path, ft_tiny_tokenizer):
    import io

    from ft.tools.debug import show_samples

    a = write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in qa_rows(3)])
    out = prepare(tmp_path, ft_tiny_tokenizer, a, shuffle=False)
    plain = io.StringIO()
    show_samples(out.train, ft_tiny_tokenizer, 2, stream=plain, colour=False)
    text = plain.getvalue()
    assert "What is 0 plus 0?[+The result is 0.<|im_end|>+]" in text
    assert "What is 1 plus 1?[+The result is 2.<|im_end|>+]" in text and "What is 2" not in text
    assert "\033[" not in text
    coloured = io.StringIO()
    show_samples(out.train, ft_tiny_tokenizer, 1, stream=coloured, colour=True)
    assert "\033[32mThe result is 0.<|im_end|>\033[0m" in coloured.getvalue()
    assert "\033[90mWhat is 0 plus 0?\033[0m" in coloured.getvalue()


def test_debug_view_splits_packed_rows_into_their_samples(ft_tiny_tokenizer):
    import io

    from ft.tools.debug import show_samples

    ids = ft_tiny_tokenizer.encode("hi there", add_special_tokens=False)
    row = {"input_ids": ids + ids, "labels": [IGNORE_INDEX] + ids[1:] + [IGNORE_INDEX] + ids[1:],
           "position_ids": list(range(len(ids))) * 2}
    buf = io.StringIO()
    show_samples([row], ft_tiny_tokenizer, 5, stream=buf, colour=False)
    text = buf.getvalue()
    assert "2 packed samples" in text and "[sample 2/2" in text


def test_ft_preprocess_debug_prints_labelled_samples(tmp_path, ft_tiny_model_dir, write_yaml):
    from ft.tools.testing import FtRunner, registered_plugin

    a = write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in qa_rows(4)] + ["{broken"])
    cfg = write_yaml({"base_model": str(ft_tiny_model_dir), "datasets": [{"path": str(a), "type": "qa"}],
                      "dataset_prepared_path": str(tmp_path / "prepared"), "sequence_len": 64})
    with registered_plugin(QAPlugin(), "qa_test_format"):
        result = FtRunner().preprocess(cfg, "--debug", "2")
    result.assert_ok()
    assert "[+The result is" in result.output and "--- sample 2 (" in result.output and "--- sample 3" not in result.output
    assert f"{a}:" in result.output, "each sample names its file and line"
    assert (tmp_path / "prepared").is_dir()


def test_debug_view_names_the_file_line_of_each_sample(tmp_path, ft_tiny_tokenizer):
    """Shuffled, with a malformed line before them: each sample says where it came from, not its position."""
    import io

    from ft.tools.debug import show_samples

    a = write_lines(tmp_path / "a.jsonl", ["{broken"] + [json.dumps(r) for r in qa_rows(6)])
    out = prepare(tmp_path, ft_tiny_tokenizer, a, seed=3)
    buf = io.StringIO()
    show_samples(out.train, ft_tiny_tokenizer, 6, stream=buf, colour=False, where=out.where)
    text = buf.getvalue()
    for i in range(6):  # row i of qa_rows is on line i + 2
        line = next(x for x in text.splitlines() if x.startswith("---") and f"{a}:{i + 2})" in x)
        body = text.split(line, 1)[1].split("---", 1)[0]
        assert f"What is {i} plus {i}?" in body, (line, body)
    assert [out.where(k) for k in range(6)] != [f"{a}:{i + 2}" for i in range(6)], "the samples are shuffled"


def test_an_empty_dataset_file_is_a_warning_naming_the_entry(tmp_path, ft_tiny_tokenizer, caplog, write_yaml):
    from ft.engine.data import prepare_datasets
    from ft.kernel.context import load_context

    a = write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in qa_rows(3)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = write_yaml(base_config(tmp_path, a, empty))
    ctx = load_context(config, extra_plugins=[("qa_test_format", QAPlugin())])
    with caplog.at_level(logging.WARNING, logger="ft"):
        prepare_datasets(ctx, ft_tiny_tokenizer)
    assert f"{config}:" in caplog.text and f"datasets[1].path: {empty} has no rows" in caplog.text, caplog.text
