"""The export carries a Hugging Face dataset card (issue 22, item 14): ``<export>/README.md`` whose YAML
header parses and is the Hub's card metadata (licence from the inputs, language from the lang scorer,
size category, task category, ``configs`` naming the exported files), whose body holds the run's own
counts, sources and provenance, and whose folder ``datasets.load_dataset`` loads as the card says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import yaml

from conftest import ROOT, write_flow
from curate.config import load_flow
from curate.pipeline import execute

EXPORT = {"layouts": ["messages", "prompt_completion", "alpaca", "sharegpt"], "file_types": ["jsonl", "parquet"]}
LICENSED = {"path": "data/sample/alpaca_gpt4_en.json", "name": "alpaca_en", "limit": 6, "license": "cc-by-nc-4.0"}
UNLICENSED = {"path": "data/sample/alpaca_gpt4_zh.json", "name": "alpaca_zh", "limit": 4}


def _card(export: Path) -> tuple[dict, str]:
    text = (export / "README.md").read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


@pytest.fixture(scope="module")
def lang_run(tmp_path_factory):
    """English and Chinese rows, a lang scorer and a threshold that keeps the English ones."""
    pytest.importorskip("lingua")
    d = tmp_path_factory.mktemp("card")
    flow = write_flow(d, name="card", description="English rows of two Alpaca-GPT4 samples.", base_dir=str(ROOT),
                      output_dir=str(d / "out"), store_dir=str(d / "store"), inputs=[LICENSED, UNLICENSED],
                      score=[{"method": "heuristic"},
                             {"method": "lang", "languages": ["en"], "candidates": ["en", "zh"], "accuracy": "low"}],
                      select=[{"method": "threshold", "score": "lang.lang", "min": 1},
                              {"method": "threshold", "score": "heuristic.response_tokens", "min": 3}],
                      export=EXPORT, report={"plots": False})
    summary = execute(load_flow(flow))
    assert summary["counts"]["selected"] == 6 and summary["counts"]["filtered"] == 4
    return summary, d / "out" / "export"


def test_the_header_is_hub_card_metadata(lang_run):
    summary, export = lang_run
    header, _ = _card(export)
    assert header["license"] == ["cc-by-nc-4.0", "unknown"]  # one input states none
    assert header["language"] == ["en"]  # every selected row is flagged English by the lang scorer
    assert header["size_categories"] == ["n<1K"] and header["task_categories"] == ["text-generation"]
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["sidecars"]["card"] == "README.md"
    pq_files = {f["layout"]: f for f in manifest["files"] if f["file_type"] == "parquet"}
    assert header["configs"] == [{"config_name": layout, "data_files": [{"split": "train", "path": f["path"]}],
                                  "description": f"curate {layout} layout, {f['n_rows']} rows, sha256 {f['sha256']}",
                                  **({"default": True} if layout == "messages" else {})}
                                 for layout, f in ((lay, pq_files[lay]) for lay in EXPORT["layouts"])]
    for c in header["configs"]:
        assert (export / c["data_files"][0]["path"]).is_file()
    hub = pytest.importorskip("huggingface_hub")
    card = hub.DatasetCard((export / "README.md").read_text(encoding="utf-8"))  # the Hub client's own parser
    data = card.data.to_dict()
    for key in ("license", "language", "size_categories", "task_categories", "configs", "pretty_name"):
        assert data[key] == header[key], key
    assert hub.DatasetCardData(**header).to_dict() == data


def test_the_body_has_the_runs_counts_sources_and_provenance(lang_run):
    summary, export = lang_run
    _, body = _card(export)
    run = json.loads((export.parent / "run.json").read_text())
    counts = run["counts"]
    assert f"- input rows: {run['n_input']}" in body
    for outcome in ("selected", "not_selected", "filtered", "quarantined"):
        assert f"- {outcome.replace('_', ' ')}: {counts[outcome]}\n" in body
    reasons = re.findall(r"^\| (selected|not_selected|filtered|quarantined) \| (.+?) \| (\d+) \|$", body, re.M)
    assert sum(int(n) for _, _, n in reasons) == run["n_input"]
    assert ("filtered", "below_min", "4") in reasons
    for source in run["inputs"]:
        row = rf"^\| {source['source']} \| .+? \| {source['n_rows']} \| {source['n_valid']} \| {source['n_quarantined']} \|"
        assert re.search(row, body, re.M), source
    assert "| alpaca_en |" in body and "cc-by-nc-4.0 |" in body and "`alpaca_zh`: the header says `unknown`" in body
    assert run["config_hash"] in body and f"curate {run['curate_version']}" in body
    assert "English rows of two Alpaca-GPT4 samples." in body and "`lang`: lang (" in body and "threshold" in body


def test_load_dataset_on_the_folder_reads_the_card_configs(lang_run):
    summary, export = lang_run
    manifest = json.loads((export / "manifest.json").read_text())
    ds = datasets.load_dataset(str(export))  # the default config: the messages file, not the sidecars beside it
    assert list(ds) == ["train"] and ds["train"].num_rows == summary["counts"]["selected"]
    assert "messages" in ds["train"].column_names and "outcome" not in ds["train"].column_names
    rows = {f["layout"]: f["n_rows"] for f in manifest["files"]}
    for layout in EXPORT["layouts"]:
        part = datasets.load_dataset(str(export), layout, split="train")
        assert part.num_rows == rows[layout]


def test_a_card_without_lang_scorer_or_licences(tmp_path):
    flow = write_flow(tmp_path, name="plain-card", base_dir=str(ROOT), output_dir=str(tmp_path / "out"), store_dir=str(tmp_path / "store"),
                      inputs=[{**UNLICENSED, "license": "cc-by-4.0"}], score=[{"method": "heuristic"}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    summary = execute(load_flow(flow))
    header, body = _card(tmp_path / "out" / "export")
    assert header["license"] == "cc-by-4.0" and "language" not in header  # no lang scorer: the language is not guessed
    assert [(c["config_name"], c["data_files"], c.get("default")) for c in header["configs"]] == \
        [("messages", [{"split": "train", "path": "messages/curated_messages.jsonl"}], True)]
    assert "No selection step" in body and "unknown" not in yaml.safe_dump(header)
    assert datasets.load_dataset(str(tmp_path / "out" / "export"), split="train").num_rows == summary["counts"]["selected"]


def test_size_categories_follow_the_hubs_buckets():
    from curate.export.card import size_category

    assert [size_category(n) for n in (0, 999, 1000, 9_999, 10_000, 250_000, 1_000_000, 10**12)] == \
        ["n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "n>1T"]


def test_two_exports_in_folders_of_the_same_name_load_their_own_rows(tmp_path):
    """`datasets` caches a local folder under its name and a hash of the card's configs: the configs name
    each file's sha256, so a second export (also in a folder named `export`) does not load the first's rows."""
    loaded = []
    for limit in (3, 5):
        d = tmp_path / f"limit{limit}"
        flow = write_flow(d, name="same-name", base_dir=str(ROOT), output_dir=str(d / "out"), store_dir=str(tmp_path / "store"),
                          inputs=[{**LICENSED, "limit": limit}], score=[{"method": "heuristic"}],
                          export={"layouts": ["messages"], "file_types": ["parquet"]}, report={"plots": False})
        execute(load_flow(flow))
        loaded.append(datasets.load_dataset(str(d / "out" / "export"), split="train").num_rows)
    assert loaded == [3, 5]
