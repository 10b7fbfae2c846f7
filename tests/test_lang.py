"""The lang scorer: language identification with Lingua's bundled models (nothing downloads), on real
English and Chinese Alpaca-GPT4 rows, through a flow whose threshold step keeps one language."""

from __future__ import annotations

import json

import polars as pl
import pytest

from conftest import ROOT, write_flow
from curate.config import load_flow
from curate.errors import ConfigError
from curate.pipeline import execute
from curate.records import message
from curate.scorers import scorer_class

pytest.importorskip("lingua")


def test_a_flow_keeps_the_english_rows_and_says_which_language_the_others_are(tmp_path):
    flow = write_flow(tmp_path, name="lang", base_dir=str(ROOT), output_dir=str(tmp_path / "out"), store_dir=str(tmp_path / "store"),
                      inputs=[{"path": "data/sample/alpaca_gpt4_en.json", "limit": 20}, {"path": "data/sample/alpaca_gpt4_zh.json", "limit": 20}],
                      score=[{"method": "lang", "languages": ["en"], "candidates": ["en", "zh", "ja", "de", "fr", "es"]}],
                      select=[{"method": "threshold", "score": "lang.lang", "min": 1}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False})
    run = execute(load_flow(flow))
    assert run["counts"]["selected"] == 20 and run["counts"]["filtered"] == 20
    ledger = pl.read_parquet(tmp_path / "out" / "ledger.parquet")
    dropped = ledger.filter(pl.col("outcome") == "filtered")
    assert set(dropped["source"]) == {"alpaca_gpt4_zh"} and set(dropped["reason"]) == {"below_min"}
    scores = pl.read_parquet(tmp_path / "out" / "select" / "scores.parquet")
    zh = scores.filter(pl.col("source") == "alpaca_gpt4_zh")
    en = scores.filter(pl.col("source") == "alpaca_gpt4_en")
    assert (en["lang.lang_score"] > 0.5).all() and (zh["lang.lang_score"] < 0.05).all()
    # the detected language is in each row's components: the Chinese rows are named zh
    comps = [s.components["lang"] for s in scorer_class("lang")("lang", {"languages": ["en"], "candidates": ["en", "zh", "ja"]})
             .score_records([{"messages": [message("user", r["instruction"]), message("assistant", r["output"])]}
                             for r in json.loads((ROOT / "data/sample/alpaca_gpt4_zh.json").read_text(encoding="utf-8"))[:5]])]
    assert comps == ["zh"] * 5


def test_undecidable_rows_unknown_codes_and_the_role_labels():
    scorer = scorer_class("lang")("lang", {"languages": ["de"], "candidates": ["en", "de"]})
    rows = [{"messages": [message("user", "Wie spät ist es?"), message("assistant", "Es ist drei Uhr nachmittags.")]},
            {"messages": [message("user", "12 + 30"), message("assistant", "= 42")]}]
    de, digits = scorer.score_records(rows)
    # no "User:"/"Assistant:" labels in the text read (they would pull a short German row toward English)
    assert de.values["lang"] == 1.0 and de.values["lang_score"] > 0.9 and de.components["lang"] == "de"
    assert digits.status == "undecidable" and digits.components == {"lang": None}
    assert all(v != v for v in digits.values.values())  # NaN: a threshold drops it as unscored
    with pytest.raises(ConfigError, match="unknown language code xx"):
        scorer_class("lang")("lang", {"languages": ["xx"]})
    with pytest.raises(ConfigError, match="candidates must include every code in languages"):
        scorer_class("lang")("lang", {"languages": ["fr"], "candidates": ["en", "de"]})
