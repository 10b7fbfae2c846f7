"""The user's own columns survive (issue 22, item 8; ``inputs[i].keep_columns``): real flows over the
sample rows and two small JSONL files with extra columns of mixed types (id, lang, quality, meta,
generator, tags, and names a trainer reads: text, labels). The kept columns reach the ledger and every
export layout (JSONL and Parquet) under one name and one type each, the user's id as ``source_id``
beside curate's ``id``; the files still load in ``datasets`` and TRL's SFTTrainer; and a flow that
does not set the option writes exactly the columns it wrote before."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, write_flow
from curate.config import load_flow
from curate.errors import ConfigError
from curate.ledger import LEDGER_SCHEMA
from curate.pipeline import execute

LAYOUTS = ["messages", "prompt_completion", "alpaca", "sharegpt"]
EXPORT = {"layouts": LAYOUTS, "file_types": ["jsonl", "parquet"]}
SAMPLE = {"path": "data/sample/alpaca_gpt4_en.json", "name": "alpaca", "limit": 3}

# file A: quality is a number, id a string, meta a dict; file B: quality a string, id a number, meta other keys
ROWS_A = [
    {"instruction": "Name a colour of the sky on a clear day.", "output": "Blue.", "id": "a-1", "lang": "en", "quality": 5,
     "meta": {"src": "forum", "n": 1}, "generator": "human", "tags": ["sky", "colour"], "text": "a stray text column", "labels": 1},
    {"instruction": "What is two plus two?", "output": "Two plus two is four.", "id": "a-2", "lang": "en", "quality": 4.5,
     "meta": {"src": "book", "n": 2}, "generator": "gpt-4", "tags": ["maths"], "text": "another", "labels": 0},
    {"instruction": "This row has an empty answer.", "output": "", "id": "a-3", "lang": "en", "quality": 1},  # quarantined
]
ROWS_B = [
    {"instruction": "Say good morning in French.", "output": "Bonjour !", "id": 17, "lang": "fr", "quality": "high",
     "meta": {"origin": "crawl"}, "generator": None, "tags": []},
    {"instruction": "Translate 'cat' into German.", "output": "Katze.", "id": 18, "lang": "de", "quality": float("nan"),
     "meta": {"origin": "crawl", "page": [1, 2]}, "generator": "human", "tags": ["translation"]},
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(d: Path, store: Path, keep_a=None, keep_b=None, name: str = "keep") -> Path:
    a, b = _write(d / "a.jsonl", ROWS_A), _write(d / "b.jsonl", ROWS_B)
    inputs = [dict(SAMPLE), {"path": str(a), "name": "a"}, {"path": str(b), "name": "b"}]
    if keep_a is not None:
        inputs[1]["keep_columns"] = keep_a
    if keep_b is not None:
        inputs[2]["keep_columns"] = keep_b
    flow = write_flow(d, name=name, base_dir=str(ROOT), output_dir=str(d / "out"), store_dir=str(store), inputs=inputs,
                      score=[{"method": "heuristic"}], export=EXPORT, report={"plots": False})
    summary = execute(load_flow(flow))
    assert summary["counts"] == {"selected": 7, "not_selected": 0, "filtered": 0, "quarantined": 1}
    return d / "out"


@pytest.fixture(scope="module")
def kept(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keep-all")
    return _run(d, d / "store", keep_a="all", keep_b="all")


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keep-unset")
    return _run(d, d / "store")


def _rows(export: Path, f: dict) -> list[dict]:
    path = export / f["path"]
    if f["file_type"] == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return pq.read_table(path).to_pylist()


#: what each user row becomes in every file: input `id` -> source_id; text/labels renamed (TRL reads them);
#: quality has numbers and strings -> strings; meta's dicts differ in keys -> JSON text; tags: lists of strings
EXPECTED = {
    "a-1": {"source_id": "a-1", "lang": "en", "quality": "5", "meta": '{"n":1,"src":"forum"}', "generator": "human",
            "tags": ["sky", "colour"], "source_text": "a stray text column", "source_labels": 1},
    "a-2": {"source_id": "a-2", "lang": "en", "quality": "4.5", "meta": '{"n":2,"src":"book"}', "generator": "gpt-4",
            "tags": ["maths"], "source_text": "another", "source_labels": 0},
    "17": {"source_id": "17", "lang": "fr", "quality": "high", "meta": '{"origin":"crawl"}', "generator": None, "tags": [],
           "source_text": None, "source_labels": None},
    "18": {"source_id": "18", "lang": "de", "quality": None, "meta": '{"origin":"crawl","page":[1,2]}', "generator": "human",
           "tags": ["translation"], "source_text": None, "source_labels": None},
}
CARRIED = set(EXPECTED["a-1"])


def test_every_export_file_carries_the_users_columns(kept):
    export = kept / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert len(manifest["files"]) == 8
    for f in manifest["files"]:
        rows = _rows(export, f)
        assert len(rows) == 7, f
        for r in rows:
            assert CARRIED <= set(r), (f["path"], sorted(r))
            assert not {"text", "labels"} & set(r), f["path"]  # TRL would read these: renamed
            assert len(r["id"]) == 64  # curate's sample_id stays the id
        users = {r["source_id"]: {k: r[k] for k in CARRIED} for r in rows if r["source_id"] is not None}
        assert users == EXPECTED, f["path"]
        sample = [r for r in rows if r["curate.source"] == "alpaca"]
        assert len(sample) == 3 and all(r[k] is None for r in sample for k in CARRIED)  # the sample input keeps none: nulls
        cols = f["columns"]
        assert cols["names"]["id"] == "source_id" and cols["names"]["text"] == "source_text" and cols["names"]["labels"] == "source_labels"
        assert cols["as_string"] == ["source_id", "quality"]
        assert cols["as_json"] == ["meta"]
    # one type per column in Parquet: strings, and the lists stay lists
    table = pq.read_table(export / "messages_parquet" / "curated_messages.parquet")
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert table.schema.field("quality").type == pa.string() and table.schema.field("source_labels").type == pa.int64()
    # the user columns come after the layout's fields, before curate's own
    names = table.column_names
    assert names[:2] == ["id", "messages"] and names.index("lang") < names.index("curate.source")


def test_the_ledger_carries_the_users_columns_for_every_input_row(kept):
    for path in (kept / "ledger.parquet", kept / "export" / "ledger.parquet"):
        ledger = pq.read_table(path)
        assert ledger.column_names[:len(LEDGER_SCHEMA)] == LEDGER_SCHEMA.names
        assert CARRIED <= set(ledger.column_names)
        rows = ledger.to_pylist()
        assert len(rows) == 8
        by_id = {r["source_id"]: r for r in rows if r["source_id"] is not None}
        for uid, want in EXPECTED.items():
            assert {k: by_id[uid][k] for k in CARRIED} == want
        bad = by_id["a-3"]  # the quarantined row keeps its columns too (from its raw text)
        assert bad["outcome"] == "quarantined" and bad["lang"] == "en" and bad["quality"] == "1"


def test_the_exports_still_load_in_datasets_and_trl(kept):
    export = kept / "export"
    for layout in ("messages", "prompt_completion"):
        for path in (export / layout / f"curated_{layout}.jsonl", export / f"{layout}_parquet" / f"curated_{layout}.parquet"):
            ds = datasets.load_dataset("json" if path.suffix == ".jsonl" else "parquet", data_files=str(path), split="train")
            assert ds.num_rows == 7 and {"source_id", "lang", "meta"} <= set(ds.column_names)
            assert ds.features["tags"] == datasets.List(datasets.Value("string"))
    pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import is_conversational

    from curate.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")  # the tokenizer only; the model is a 2-layer toy: no weights load
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512))
    for layout in ("messages", "prompt_completion"):
        ds = datasets.load_dataset("json", data_files=str(export / layout / f"curated_{layout}.jsonl"), split="train")
        assert is_conversational(ds[0])
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds,
                             args=SFTConfig(output_dir=str(kept / f"trl-{layout}"), max_length=256, max_steps=1, report_to="none",
                                            use_cpu=True, bf16=False, per_device_train_batch_size=2, disable_tqdm=True,
                                            activation_checkpointing=False, dataloader_num_workers=0))
        prepared = trainer.train_dataset
        assert prepared.num_rows == 7 and "input_ids" in prepared.column_names
        trainer.train()  # one step on the toy model: the collator takes the prepared rows, extra columns and all


def test_a_list_keeps_the_named_columns_only(tmp_path):
    out = _run(tmp_path, tmp_path / "store", keep_a=["lang", "id", "nowhere"], keep_b=["lang"], name="keep-list")
    export = out / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    for f in manifest["files"]:
        rows = _rows(export, f)
        layout_fields = ("id", "messages", "prompt", "completion", "instruction", "input", "output", "conversations")
        own = {k for k in rows[0] if not k.startswith(("curate.", "score.")) and k not in layout_fields}
        assert own == {"lang", "source_id", "nowhere"}, (f["path"], own)
        assert sorted(r["lang"] for r in rows if r["lang"]) == ["de", "en", "en", "fr"]
        assert f["columns"]["missing"] == ["nowhere"]
    ledger = pq.read_table(out / "ledger.parquet")
    assert ledger.column_names == [*LEDGER_SCHEMA.names, "lang", "source_id", "nowhere"]


def test_a_flow_without_the_option_writes_the_columns_it_wrote_before(plain, kept):
    """Byte-identity by construction: without keep_columns no task gets a plan, so the rows, the ledger
    and the manifest's file entries have exactly the old keys (and the config hash is the old one)."""
    export = plain / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    old_keys = {"messages": {"id", "messages"}, "prompt_completion": {"id", "prompt", "completion"},
                "alpaca": {"id", "instruction", "input", "output"}, "sharegpt": {"id", "conversations"}}
    for f in manifest["files"]:
        assert set(f) == {"layout", "file_type", "path", "n_rows", "sha256", "skipped"}, f
        for r in _rows(export, f):
            assert {k for k in r if not k.startswith(("curate.", "score."))} == old_keys[f["layout"]], (f["path"], sorted(r))
    assert pq.read_table(plain / "ledger.parquet").schema == LEDGER_SCHEMA
    assert pq.read_table(export / "ledger.parquet").schema == LEDGER_SCHEMA
    # the kept run's training rows differ only by the carried columns
    for layout in LAYOUTS:
        a = _rows(export, {"path": f"{layout}/curated_{layout}.jsonl", "file_type": "jsonl"})
        b = _rows(kept / "export", {"path": f"{layout}/curated_{layout}.jsonl", "file_type": "jsonl"})
        assert a == [{k: v for k, v in r.items() if k not in CARRIED} for r in b]


def test_the_option_is_out_of_the_config_hash_until_set(tmp_path):
    base = dict(name="h", base_dir=str(ROOT), inputs=[dict(SAMPLE)], score=[{"method": "heuristic"}])
    unset = load_flow(write_flow(tmp_path / "a", **base)).fingerprint()
    none = load_flow(write_flow(tmp_path / "b", **{**base, "inputs": [{**SAMPLE, "keep_columns": "none"}]})).fingerprint()
    every = load_flow(write_flow(tmp_path / "c", **{**base, "inputs": [{**SAMPLE, "keep_columns": "all"}]})).fingerprint()
    assert unset == none != every
    for bad in ([], "some", ["a", "a"]):
        with pytest.raises(ConfigError, match="keep_columns"):
            load_flow(write_flow(tmp_path / "d", **{**base, "inputs": [{**SAMPLE, "keep_columns": bad}]}))


def test_unify_decides_one_type_per_column():
    from curate.ingest.columns import unify

    assert unify(["a", None, "b"]) == (["a", None, "b"], pa.string(), None)
    assert unify([1, 2.5]) == ([1.0, 2.5], pa.float64(), None)
    assert unify([1, "x", True]) == (["1", "x", "true"], pa.string(), "string")
    assert unify([float("inf"), 3.0])[0] == [None, 3.0]
    same = [{"a": 1, "b": ["x"]}, {"a": 2, "b": []}]
    assert unify(same)[0] == same and unify(same)[2] is None
    assert unify([{"a": 1}, {"b": 1}]) == (['{"a":1}', '{"b":1}'], pa.string(), "json")
    assert unify([{}, None]) == (["{}", None], pa.string(), "json")  # Parquet cannot hold a struct without fields
    assert unify([2**70]) == ([str(2**70)], pa.string(), "string")


def test_renames_do_not_depend_on_the_column_order():
    from curate.ingest.columns import column_names

    for names in (["id", "source_id"], ["source_id", "id"]):
        assert column_names(names) == {"id": "source_id", "source_id": "source_source_id"}
    for names in (["text", "source_text", "lang"], ["lang", "source_text", "text"]):
        assert column_names(names) == {"text": "source_source_text", "source_text": "source_text", "lang": "lang"}
