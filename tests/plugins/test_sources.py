"""The sources plugin: local files of every supported type, directories, fsspec URLs, hub ids."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from test_data import base_config, make_context

from ft.kernel.errors import DataError

ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]


def load(tmp_path, path, **entry):
    ctx = make_context(base_config(tmp_path, Path("placeholder")) | {
        "datasets": [{"path": str(path), "type": "qa", **entry}]})
    raw = ctx.pm.call("ft_load_dataset", cfg=ctx.cfg, entry=ctx.cfg.datasets[0])
    return raw, ctx


def fingerprint(ctx) -> str:
    return dict(ctx.pm.each("ft_data_fingerprint", cfg=ctx.cfg, entry=ctx.cfg.datasets[0]))["sources"]


def all_rows(raw) -> list[dict]:
    return raw.batch(0, len(raw))


def test_jsonl_rows_with_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n")
    raw, _ = load(tmp_path, p)
    assert all_rows(raw) == ROWS[:3]
    assert [raw.where(i) for i in range(3)] == [f"{p}:1", f"{p}:2", f"{p}:4"]
    assert raw.blank_lines == 1 and raw.dropped == []


def test_invalid_utf8_line_is_dropped_by_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n' + json.dumps(ROWS[1]).encode())
    raw, _ = load(tmp_path, p)
    assert all_rows(raw) == ROWS[:2]
    assert raw.dropped[0].where == f"{p}:2" and "UTF-8" in raw.dropped[0].detail


@pytest.mark.parametrize("layout", ["array", "wrapped", "wrapped_pretty", "lines"])
def test_json_files_as_array_wrapped_or_lines(tmp_path, layout):
    p = tmp_path / "d.json"
    if layout == "array":
        p.write_text(json.dumps(ROWS + [7], indent=2))
    elif layout == "wrapped":
        p.write_text(json.dumps({"data": ROWS}))
    elif layout == "wrapped_pretty":
        p.write_text(json.dumps({"data": ROWS}, indent=2))
    else:
        p.write_text("\n".join(json.dumps(r) for r in ROWS))
    raw, _ = load(tmp_path, p)
    assert all_rows(raw) == ROWS
    if layout == "array":
        assert raw.dropped[0].where == f"{p}: item 6"
        assert raw.where(4) == f"{p}: item 5"


def test_parquet_csv_arrow_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in ROWS))
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in ROWS))
    for name in ("d.parquet", "d.arrow", "f.arrow", "d.csv", "g.jsonl.gz"):
        raw, _ = load(tmp_path, tmp_path / name)
        assert all_rows(raw) == ROWS, name
    raw, _ = load(tmp_path, tmp_path / "d.parquet")
    assert raw.where(2) == f"{tmp_path / 'd.parquet'}: row 3"


def test_csv_rows_with_the_wrong_number_of_columns_are_reported(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,completion\na,b\nc,d,e\nf,g\n")
    raw, _ = load(tmp_path, p)
    assert all_rows(raw) == [{"prompt": "a", "completion": "b"}, {"prompt": "f", "completion": "g"}]
    assert raw.dropped[0].reason == "malformed" and "expected 2 columns, got 3" in raw.dropped[0].detail
    assert raw.dropped[0].where.startswith(str(p))


def test_ds_type_reads_a_file_without_a_known_extension(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("\n".join(json.dumps(r) for r in ROWS))
    with pytest.raises(DataError, match="set ds_type"):
        load(tmp_path, p)
    raw, _ = load(tmp_path, p, ds_type="jsonl")
    assert all_rows(raw) == ROWS


def test_directory_of_files_and_data_files_filter(tmp_path):
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:2]))
    (d / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[2:]) + "\n{bad\n")
    (d / "notes.txt").write_text("ignored")
    raw, ctx = load(tmp_path, d)
    assert all_rows(raw) == ROWS
    assert raw.where(2) == f"{d / 'sub' / 'b.jsonl'}:1"
    assert raw.dropped[0].where == f"{d / 'sub' / 'b.jsonl'}:4"
    raw, _ = load(tmp_path, d, data_files="a.jsonl")
    assert all_rows(raw) == ROWS[:2]
    with pytest.raises(DataError, match="has no files matching"):
        load(tmp_path, d, data_files="*.parquet")


def test_a_saved_dataset_directory_and_its_split(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    raw, _ = load(tmp_path, tmp_path / "saved")
    assert all_rows(raw) == ROWS
    DatasetDict({"train": Dataset.from_list(ROWS[:1]), "test": Dataset.from_list(ROWS[1:])}).save_to_disk(
        str(tmp_path / "dd"))
    raw, _ = load(tmp_path, tmp_path / "dd", split="test")
    assert all_rows(raw) == ROWS[1:]
    with pytest.raises(DataError, match="split 'valid' is not in"):
        load(tmp_path, tmp_path / "dd", split="valid")


def test_fingerprint_follows_content_not_timestamps(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]))
    _, ctx = load(tmp_path, p)
    a = fingerprint(ctx)
    p.write_text(json.dumps(ROWS[0]))
    assert fingerprint(ctx) == a
    p.write_text(json.dumps(ROWS[1]))
    assert fingerprint(ctx) != a
    d = tmp_path / "dir"
    d.mkdir()
    (d / "x.jsonl").write_text("{}")
    _, ctx = load(tmp_path, d)
    b = fingerprint(ctx)
    (d / "y.jsonl").write_text("{}")
    assert fingerprint(ctx) != b


def test_relative_paths_are_found_next_to_the_config(tmp_path, write_yaml, monkeypatch):
    from test_data import QAPlugin

    from ft.kernel.context import load_context

    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]))
    cfg_path = write_yaml({"base_model": "x", "datasets": [{"path": "d.jsonl", "type": "qa"}]})
    monkeypatch.chdir("/")
    ctx = load_context(str(cfg_path), extra_plugins=[("qa_test_format", QAPlugin())])
    raw = ctx.pm.call("ft_load_dataset", cfg=ctx.cfg, entry=ctx.cfg.datasets[0])
    assert all_rows(raw) == ROWS[:1]


def test_fsspec_urls(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/ft-test/one.jsonl", ("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n{oops\n").encode())
    fs.pipe("/ft-test/two.jsonl", json.dumps(ROWS[3]).encode())
    raw, ctx = load(tmp_path, "memory://ft-test/one.jsonl")
    assert all_rows(raw) == ROWS[:3]
    assert raw.dropped[0].where == "memory:///ft-test/one.jsonl:4"
    raw, ctx = load(tmp_path, "memory://ft-test")
    assert all_rows(raw) == ROWS[:4]
    first = fingerprint(ctx)
    fs.pipe("/ft-test/two.jsonl", json.dumps(ROWS[4]).encode() + b"\n")
    assert fingerprint(ctx) != first


def test_a_url_whose_backend_is_missing_says_what_to_install(tmp_path):
    import importlib.util

    from ft.kernel.errors import MissingDependencyError

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    with pytest.raises(MissingDependencyError, match="pip install s3fs"):
        load(tmp_path, "s3://bucket/data.jsonl")


def test_a_missing_local_file_and_an_unreachable_hub_id_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"datasets\[0\]\.path: file 'nope/data.jsonl' not found"):
        load(tmp_path, "nope/data.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="neither a local file nor a readable hub dataset") as err:
        load(tmp_path, "some-org/some-dataset")
    assert "HF_HUB_OFFLINE" in str(err.value)


def test_csv_cells_are_read_as_text_so_numeric_answers_are_kept(tmp_path, ft_tiny_tokenizer):
    """An alpaca CSV whose outputs are numbers: every row is trained on, none dropped as "'output' is a int"."""
    from ft.engine.data import prepare_datasets

    p = tmp_path / "sums.csv"
    p.write_text("instruction,input,output\n" + "".join(f"What is {i} plus {i}?,,{2 * i}\n" for i in range(6)))
    raw, _ = load(tmp_path, p)
    assert all_rows(raw)[2] == {"instruction": "What is 2 plus 2?", "input": "", "output": "4"}
    cfg = base_config(tmp_path, p, sequence_len=256)
    cfg["datasets"][0]["type"] = "alpaca"
    data = prepare_datasets(make_context(cfg), ft_tiny_tokenizer)
    assert data.report["dropped_total"] == 0 and len(data.train) == 6


def test_malformed_csv_rows_and_later_drops_name_their_file_line(tmp_path, ft_tiny_tokenizer):
    """Lines, not the count of kept rows: a quoted cell spanning two lines and a skipped row shift them."""
    from ft.engine.data import prepare_datasets

    p = tmp_path / "d.csv"
    p.write_text('prompt,completion\na,b\n"two\nlines",c\nd,e,f\ng,\nh,i\n')
    raw, _ = load(tmp_path, p)
    assert [raw.where(i) for i in range(len(raw))] == [f"{p}:2", f"{p}:3", f"{p}:6", f"{p}:7"]
    assert [(d.where, d.detail) for d in raw.dropped] == [(f"{p}:5", "expected 2 columns, got 3")]
    data = prepare_datasets(make_context(base_config(tmp_path, p)), ft_tiny_tokenizer)
    wheres = [e["where"] for reason in data.report["dropped"].values() for e in reason["examples"]]
    assert sorted(wheres) == [f"{p}:5", f"{p}:6"], data.report  # line 6: an empty completion (nothing to train)
