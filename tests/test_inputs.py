"""Inputs as people have them (issue 22, items 6, 9 and 10): compressed files, CSV/TSV with another
delimiter, column-format JSON, a wrapped array, CSV line numbers that count the header, paths with
glob characters and square brackets, and output files that follow the user's umask.

Small data written in tmp_path; no model is loaded (the one end-to-end run scores with the heuristic)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import ROOT, write_flow
from curate.cli import app
from curate.config import IngestSpec, InputSpec
from curate.errors import IngestError
from curate.ingest.read import read_input
from curate.ingest.readers import csv_delimiter, expand_paths, file_type, read_json
from curate.io import atomic_path, temp_dir, write_json, write_parquet, write_text
from curate.stages.ingest import build_dataset

ROWS = [{"instruction": f"Name colour number {i}.", "input": "", "output": f"Colour {i} is blue."} for i in range(5)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


def ingest(tmp_path: Path, **spec) -> tuple:
    ref = read_input(InputSpec(**spec), 0, str(tmp_path), str(tmp_path / "work"), IngestSpec(shard_size=2))
    return ref, pq.read_table(ref.records_path).to_pylist(), pq.read_table(ref.quarantine_path).to_pylist()


def _zstd(data: bytes, path: Path) -> None:
    with pa.output_stream(str(path), compression="zstd") as f:
        f.write(data)


def _csv(rows: list[dict], delimiter: str) -> str:
    import csv
    import io

    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


# -- item 9: compressed inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix, pack", [
    (".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress), (".zst", None),
])
def test_compressed_jsonl_json_and_csv_are_read_like_the_plain_files(tmp_path, suffix, pack):
    plain = {"a.jsonl": JSONL, "b.json": json.dumps(ROWS, indent=1).encode(), "c.csv": _csv(ROWS, ",").encode()}
    for name, data in plain.items():
        (tmp_path / name).write_bytes(data)
        packed = tmp_path / "packed" / f"{name}{suffix}"
        packed.parent.mkdir(exist_ok=True)
        _zstd(data, packed) if pack is None else packed.write_bytes(pack(data))
        assert file_type(packed) == file_type(tmp_path / name)
        ref0, want, q0 = ingest(tmp_path / "p0", path=str(tmp_path / name))
        ref, got, q = ingest(tmp_path / "p1" / name, path=str(packed))
        assert not q and not q0 and ref.format == "alpaca"
        assert ref.n_rows == ref.n_valid == len(ROWS)
        assert ref.source == Path(name).stem  # 'a', not 'a.jsonl'
        keys = ("sample_id", "messages", "source_index", "source_line")
        assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]
        assert [r["source_file"] for r in got] == [str(packed)] * len(ROWS)


def test_compressed_jsonl_quarantines_by_line_and_limit_applies(tmp_path):
    lines = [json.dumps(ROWS[0]), '{"instruction": "x", "output": ', json.dumps(ROWS[1]), json.dumps(ROWS[2])]
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    ref, recs, q = ingest(tmp_path, path="d.jsonl.gz")
    assert [r["source_line"] for r in recs] == [1, 3, 4]
    assert [(r["source_line"], r["error_class"]) for r in q] == [(2, "invalid_json")] and q[0]["message"].startswith("d.jsonl.gz:2:")
    ref, recs, q = ingest(tmp_path / "lim", path=str(tmp_path / "d.jsonl.gz"), limit=2)
    assert ref.n_rows == 2


def test_a_row_that_is_not_a_record_keeps_its_text_in_the_quarantine(tmp_path):
    """Invalid JSON, invalid UTF-8, a JSON array or string where an object belongs, a CSV row with more cells than
    its header: each quarantined row keeps the text it was read as (``raw``), whatever the file type — so a curator
    can read what was dropped (before, ``raw`` was null for all of these)."""
    bad = [json.dumps(ROWS[0]).encode(), b'{"instruction": "cut', b"\xff\xfe bad bytes", b'[1, "AN ARRAY"]', b'"A STRING"']
    (tmp_path / "plain.jsonl").write_bytes(b"\n".join(bad) + b"\n")
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b"\n".join(bad[:2] + bad[3:]) + b"\n"))
    (tmp_path / "a.json").write_text(json.dumps([ROWS[0], [1, "AN ARRAY"], "A STRING"]))
    (tmp_path / "c.csv").write_text("instruction,input,output\nHi,,Hello\nextra,,cells,EXTRA CELL\n")
    want = {"plain.jsonl": ['{"instruction": "cut', "\ufffd\ufffd bad bytes", '[1, "AN ARRAY"]', '"A STRING"'],
            "d.jsonl.gz": ['{"instruction": "cut', '[1, "AN ARRAY"]', '"A STRING"'],
            "a.json": ['[1, "AN ARRAY"]', '"A STRING"'], "c.csv": ["extra,,cells,EXTRA CELL"]}
    for name, raws in want.items():
        _, recs, q = ingest(tmp_path / name.replace(".", "-"), path=str(tmp_path / name))
        assert len(recs) == 1 and [r["raw"] for r in q] == raws, (name, q)


def test_broken_or_misnamed_compressed_file_is_one_clear_error(tmp_path):
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(JSONL)[:40])
    with pytest.raises(IngestError, match=r"cut.jsonl.gz: cannot decompress it as gzip"):
        ingest(tmp_path, path="cut.jsonl.gz")
    (tmp_path / "plain.csv.zst").write_bytes(_csv(ROWS, ",").encode())
    with pytest.raises(IngestError, match=r"plain.csv.zst: cannot decompress it as zstd"):
        ingest(tmp_path, path="plain.csv.zst")
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(IngestError, match="compressed Parquet"):
        ingest(tmp_path, path="x.parquet.gz")
    (tmp_path / "x.txt.gz").write_bytes(b"")
    with pytest.raises(IngestError, match=r"unknown file type '\.txt\.gz'"):
        ingest(tmp_path, path="x.txt.gz")


def test_latin1_in_a_compressed_csv_names_the_line(tmp_path):
    (tmp_path / "l.csv.gz").write_bytes(gzip.compress(b"instruction,output\nok,fine\ncaf\xe9,x\n"))
    with pytest.raises(IngestError, match=r"l.csv.gz:3: invalid UTF-8"):
        ingest(tmp_path, path="l.csv.gz")


def test_parquet_and_saved_hf_inputs_still_read(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "r.parquet")
    ref, recs, q = ingest(tmp_path, path="r.parquet")
    assert (ref.format, ref.n_valid, recs[0]["source_line"]) == ("alpaca", 5, None)
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf [v2]"))
    ref, recs, q = ingest(tmp_path / "w", path=str(tmp_path / "hf [v2]"))
    assert (ref.format, ref.n_valid) == ("alpaca", 5)


# -- item 9: CSV/TSV delimiters and line numbers ------------------------------------------------------


@pytest.mark.parametrize("delimiter", [";", "\t", "|", ","])
def test_csv_delimiter_is_detected_from_the_header(tmp_path, delimiter):
    rows = [{**r, "output": r["output"].replace("blue", "blue, green; or red")} for r in ROWS]
    (tmp_path / "x.csv").write_text(_csv(rows, delimiter))
    assert csv_delimiter(tmp_path / "x.csv", "csv") == delimiter
    ref, recs, q = ingest(tmp_path, path="x.csv")
    assert not q and ref.n_valid == 5 and recs[0]["messages"][1]["content"] == rows[0]["output"]


def test_tsv_delimiter_defaults_to_tab(tmp_path):
    (tmp_path / "t.tsv").write_text(_csv(ROWS, "\t"))
    assert csv_delimiter(tmp_path / "t.tsv", "tsv") == "\t"
    (tmp_path / "one.tsv").write_text("instruction\nhello\n")
    assert csv_delimiter(tmp_path / "one.tsv", "tsv") == "\t"  # nothing to tell from: the file type's own


def test_delimiter_option_and_a_header_that_does_not_split(tmp_path):
    (tmp_path / "caret.csv").write_text(_csv(ROWS, "^"))
    with pytest.raises(IngestError, match=r"caret.csv:2: cannot tell the format.*did not split into columns with the delimiter ','.*"
                                          r"delimiter: '\^'"):
        ingest(tmp_path, path="caret.csv")
    with pytest.raises(IngestError, match=r"declared format 'alpaca' needs.*delimiter: '\^'"):
        ingest(tmp_path / "w", path=str(tmp_path / "caret.csv"), format="alpaca")
    ref, recs, q = ingest(tmp_path / "w2", path=str(tmp_path / "caret.csv"), delimiter="^")
    assert not q and ref.n_valid == 5
    (tmp_path / "semi.csv").write_text(_csv(ROWS, ";"))
    with pytest.raises(IngestError, match="did not split into columns with the delimiter ','.*delimiter: ';'"):
        ingest(tmp_path / "w3", path=str(tmp_path / "semi.csv"), delimiter=",")
    (tmp_path / "tabs.csv").write_text(_csv(ROWS, "\t"))
    assert csv_delimiter(tmp_path / "tabs.csv", "csv", "tab") == csv_delimiter(tmp_path / "tabs.csv", "csv", "\\t") == "\t"
    with pytest.raises(IngestError, match="must be one character"):
        csv_delimiter(tmp_path / "tabs.csv", "csv", ";;")


def test_csv_line_numbers_count_the_header(tmp_path):
    text = ("instruction,output\n"
            "Name a colour.,Blue.\n"
            "Say hi,\n"  # empty response: quarantined
            "\"A cell\nover two lines\",Yes.\n"
            "Count,\"one\ntwo\"\n")
    (tmp_path / "l.csv").write_text(text)
    ref, recs, q = ingest(tmp_path, path="l.csv")
    assert [r["source_line"] for r in recs] == [2, 4, 6]
    assert [(r["source_line"], r["error_class"]) for r in q] == [(3, "empty_response")]
    assert q[0]["message"].startswith("l.csv:3:")
    ledger = pq.read_table(build_dataset([ref], str(tmp_path / "ds"), IngestSpec()).ledger_path).to_pylist()
    assert [(r["source_line"], r["outcome"]) for r in ledger] == [(3, "quarantined")]
    (tmp_path / "big.csv").write_text(f"instruction,output\nRepeat.,\"{'word ' * 60_000}\"\n")  # a 300 kB cell
    assert ingest(tmp_path / "big", path=str(tmp_path / "big.csv"))[0].n_valid == 1
    (tmp_path / "x.csv").write_text("question,answer\nhi,there\n")
    with pytest.raises(IngestError, match=r"x.csv:2: cannot tell the format"):
        ingest(tmp_path / "w", path=str(tmp_path / "x.csv"))


# -- item 9: JSON shapes ------------------------------------------------------------------------------


def test_column_format_json_is_read_as_rows(tmp_path):
    cols = {k: [r[k] for r in ROWS] for k in ROWS[0]}
    (tmp_path / "cols.json").write_text(json.dumps(cols))
    ref, recs, q = ingest(tmp_path, path="cols.json")
    assert not q and (ref.format, ref.n_rows, ref.n_valid) == ("alpaca", 5, 5)
    assert [r["messages"][1]["content"] for r in recs] == [r["output"] for r in ROWS]
    (tmp_path / "wrap.json").write_text(json.dumps({"meta": {"v": 1}, "rows": cols}))
    ref, recs, q = ingest(tmp_path / "w", path=str(tmp_path / "wrap.json"), json_field="rows")
    assert ref.n_valid == 5
    (tmp_path / "bad.json").write_text(json.dumps({"instruction": ["a", "b"], "output": ["c"]}))
    with pytest.raises(IngestError, match="lists of one length.*'instruction' has 2, 'output' has 1"):
        list(read_json(tmp_path / "bad.json"))


def test_single_records_with_message_lists_stay_single_records(tmp_path):
    one = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    (tmp_path / "one.json").write_text(json.dumps(one))
    assert [r.record for r in read_json(tmp_path / "one.json")] == [one]
    pc = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    (tmp_path / "pc.json").write_text(json.dumps(pc))
    assert [r.record for r in read_json(tmp_path / "pc.json")] == [pc]
    # a record with other list fields beside its turns (of another length) is still one record, not columns
    tagged = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "tags": ["greeting", "a", "b"]}
    (tmp_path / "tagged.json").write_text(json.dumps(tagged))
    assert [r.record for r in read_json(tmp_path / "tagged.json")] == [tagged]


def test_a_wrapped_array_names_json_field(tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"version": 1, "data": ROWS}))
    with pytest.raises(IngestError, match=r"w.json: .*under 'data' \(a list of 5 objects\).*set json_field: data"):
        ingest(tmp_path, path="w.json")
    ref, recs, q = ingest(tmp_path / "ok", path=str(tmp_path / "w.json"), json_field="data")
    assert ref.n_valid == 5
    with pytest.raises(IngestError, match=r"json_field: rows, but .*lists are under 'data'"):
        ingest(tmp_path / "no", path=str(tmp_path / "w.json"), json_field="rows")
    (tmp_path / "w2.json.gz").write_bytes(gzip.compress(json.dumps({"data": ROWS}).encode()))
    with pytest.raises(IngestError, match="set json_field: data"):
        ingest(tmp_path / "gz", path=str(tmp_path / "w2.json.gz"))


# -- item 6: paths as written ------------------------------------------------------------------------


def test_an_existing_path_with_glob_characters_is_used_literally(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "my data [v2] (final).jsonl").write_bytes(JSONL)
    (d / "my data v (final).jsonl").write_bytes(JSONL[:10])  # what '[v2]' matches as a glob: must not be read
    assert expand_paths("data/my data [v2] (final).jsonl", tmp_path) == [d / "my data [v2] (final).jsonl"]
    ref, recs, q = ingest(tmp_path, path="data/my data [v2] (final).jsonl")
    assert ref.n_valid == 5 and ref.source == "my data [v2] (final)"


def test_a_glob_under_a_folder_with_brackets(tmp_path):
    base = tmp_path / "proj [old]"
    (base / "d").mkdir(parents=True)
    for i in range(2):
        (base / "d" / f"p{i}.jsonl").write_bytes(JSONL)
    assert [p.name for p in expand_paths("d/*.jsonl", base)] == ["p0.jsonl", "p1.jsonl"]
    with pytest.raises(IngestError, match=r"d/\*\.csv: the pattern matches no file"):
        expand_paths("d/*.csv", base)
    with pytest.raises(IngestError, match=r"d/p\[2\]\.jsonl: no such file or directory .*as a glob pattern, it matches no file either"):
        expand_paths("d/p[2].jsonl", base)


def test_a_missing_path_with_brackets_is_printed_as_written(tmp_path):
    flow = write_flow(tmp_path, name="x", inputs=[{"path": "data/my data [v2] (final).jsonl"}])
    r = CliRunner().invoke(app, ["run", str(flow), "--no-prefect", "--quiet"])
    assert r.exit_code == 2, r.output
    assert "data/my data [v2] (final).jsonl: no such file" in r.output and "Traceback" not in r.output


# -- item 10: permissions follow the umask -------------------------------------------------------------


@pytest.fixture
def umask():
    def set_(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    paths = [write_text(tmp_path / "a.txt", "x"), write_json(tmp_path / "b.json", {}),
             write_parquet(tmp_path / "sub" / "c.parquet", pa.table({"x": [1]}))]
    with atomic_path(tmp_path / "d.bin") as tmp:
        tmp.write_bytes(b"1")
    paths.append(tmp_path / "d.bin")
    assert {p.name: _mode(p) for p in paths} == {p.name: 0o666 & ~mask for p in paths}
    assert _mode(tmp_path / "sub") == 0o777 & ~mask
    assert _mode(temp_dir(tmp_path, ".t.")) == 0o777 & ~mask
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_run_writes_files_others_can_read(tmp_path, umask):
    """Every file and folder under the output folder and the store follows umask 022: 0644 / 0755."""
    umask(0o022)
    flow = write_flow(tmp_path, name="perm", base_dir=str(ROOT), output_dir=str(tmp_path / "out"), store_dir=str(tmp_path / "store"),
                      inputs=[{"path": "data/sample/alpaca_gpt4_en.json", "limit": 6}], score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 3}],
                      export={"layouts": ["alpaca"], "file_types": ["jsonl", "parquet"]})
    r = CliRunner().invoke(app, ["run", str(flow), "--no-prefect", "--quiet"])
    assert r.exit_code == 0, r.output
    made = [p for d in ("out", "store") for p in (tmp_path / d).rglob("*")]
    assert any(p.name == "report.html" for p in made) and any(p.suffix == ".jsonl" for p in made)
    wrong = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in made
             if not p.is_symlink() and _mode(p) != (0o755 if p.is_dir() else 0o644)}
    assert not wrong
