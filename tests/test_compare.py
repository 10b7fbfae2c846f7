"""curate compare (issue 21, items 4-6): budgets in tokens with equal steps and tokens per budget, several
seeds with a mean and an interval, paired differences against the baselines, and the random and base-model
rows. The real bundled SmolLM2 trains (LoRA, a few steps) and is evaluated (2 eval rows, 4 answer tokens),
in-process; tests/test_train.py runs the compare flow under the real Prefect API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, write_flow
from curate.errors import ConfigError

EVAL_SET = {"path": str(ROOT / "data" / "eval" / "alpaca_eval_40.json")}
FAST_EVAL = {"eval_set": {**EVAL_SET, "limit": 2}, "generate": {"max_tokens": 4}, "max_length": 128}


@pytest.fixture(scope="module")
def pool_flow(tmp_path_factory) -> Path:
    """A pool of 20 real alpaca rows (about 90 to 300 words and marks each), heuristic scores only."""
    d = tmp_path_factory.mktemp("pool")
    return write_flow(d, name="pool", base_dir=str(ROOT), store_dir=str(d / "store"),
                      inputs=[{"path": "data/sample/cherry_alpaca.jsonl", "limit": 20}], score=[{"method": "heuristic"}], select=[],
                      export={"layouts": ["messages"], "file_types": ["jsonl"], "max_length": 512}, report={"plots": False})


def compare_file(directory: Path, pool: Path, **spec) -> Path:
    spec = {"name": "cmp", "flow": str(pool), "eval": FAST_EVAL, "output_dir": str(directory / "out"), "prefect": False, **spec}
    path = directory / "compare.yaml"
    path.write_text(json.dumps(spec))
    return path


def by_length(name: str, descending: bool, unit: str = "tokens", fill: bool = True) -> dict:
    """Rows ranked by response length, then cut by the budget (tokens: a token_budget step, filling by default)."""
    if unit == "tokens":
        return {"name": name, "select": [{"method": "top_k", "score": "heuristic.response_tokens", "budget": 1.0, "rate_base": "pool",
                                          "descending": descending}, {"method": "token_budget", "tokens": "{budget}", "fill": fill}]}
    return {"name": name, "select": [{"method": "top_k", "score": "heuristic.response_tokens", "budget": "{budget}", "descending": descending}]}


# -- configuration ------------------------------------------------------------------------------------


def test_compare_file_errors(pool_flow, tmp_path):
    from curate.compare import cell_flow, load_compare, selections

    def load(**spec):
        return load_compare(compare_file(tmp_path, pool_flow, **spec))

    random_rows = {"name": "r", "select": [{"method": "random", "budget": "{budget}"}]}
    with pytest.raises(ConfigError, match=r"selections 'r': with budget_unit tokens each selection needs a token_budget step"):
        load(budget_unit="tokens", budgets=[500], selections=[random_rows])
    with pytest.raises(ConfigError, match="whole number of tokens"):
        load(budget_unit="tokens", budgets=[0.5], selections=[by_length("short", False)])
    with pytest.raises(ConfigError, match="each seed once"):
        load(budgets=[3], seeds=[0, 0], selections=[random_rows])
    with pytest.raises(ConfigError, match="'base-model' is the base model's cells"):
        load(budgets=[3], selections=[{**random_rows, "name": "base-model"}])
    with pytest.raises(ConfigError, match=r"baselines\.randm"):
        load(budgets=[3], selections=[random_rows], baselines={"randm": False})
    # budget_unit tokens: the trainer's count (a chat_tokens scorer for train.model, cut at its max_length) is added to
    # the pool flow and counts every token_budget step that names no count of its own
    tb = {"name": "tb", "select": [{"method": "token_budget", "tokens": "{budget}"}]}
    spec = load(budget_unit="tokens", budgets=[500], selections=[tb], set=["score=[]"], train={"max_length": 300})
    flow, steps = cell_flow(spec, spec.selections[0], 500)
    assert [(s.method, s.params) for s in flow.score] == [("chat_tokens", {"model": "smollm2-135m-instruct", "max_length": 300})]
    assert steps == [{"method": "token_budget", "tokens": 500, "count": ["chat_tokens.tokens"]}] and flow.select[0].params["count"] == steps[0]["count"]
    # a step counting with scores the flow does not compute: said before anything runs
    spec = load(budget_unit="tokens", budgets=[500], set=["score=[]"],
                selections=[{"name": "tb", "select": [{**tb["select"][0], "count": ["heuristic.response_tokens"]}]}])
    with pytest.raises(ConfigError, match=r"no scorer heuristic.*add '- method: heuristic'"):
        cell_flow(spec, spec.selections[0], 500)
    # the random baseline: added by default (after the random_before steps), not when the file has one or it is turned off
    spec = load(budget_unit="tokens", budgets=[500], selections=[by_length("short", False)],
                baselines={"random_before": [{"method": "threshold", "score": "heuristic.degenerate", "max": 0}]})
    assert [s.name for s in selections(spec)] == ["short", "random"]
    assert [st.method for st in selections(spec)[1].select] == ["threshold", "random", "token_budget"]
    assert selections(spec)[1].select[-1].params["fill"] is True  # a random order fills its budget
    assert [s.name for s in selections(load(budgets=[3], selections=[{**random_rows, "name": "random"}]))] == ["random"]
    assert [s.name for s in selections(load(budgets=[3], selections=[random_rows], baselines={"random": False}))] == ["r"]
    assert [st.method for st in selections(load(budgets=[3], selections=[random_rows]))[1].select] == ["random"]


# -- the statistics -------------------------------------------------------------------------------------


def test_seed_and_row_bootstrap_and_the_paired_difference():
    from curate.evaluate.stats import paired_difference, seed_row_bootstrap

    rng = np.random.default_rng(1)
    a = rng.normal(2.0, 0.5, (3, 30))  # three seeds × 30 eval rows
    den = np.ones_like(a)
    b = seed_row_bootstrap(a, den, 500, 0)
    assert b["value"] == pytest.approx(a.mean()) and b["per_seed"] == pytest.approx(a.mean(axis=1).tolist())
    assert b["ci95"][0] < b["value"] < b["ci95"][1] and b == seed_row_bootstrap(a, den, 500, 0)  # seeded
    # token-weighted: Σ nats / Σ tokens per seed, then the mean over seeds
    tok = rng.integers(1, 9, a.shape).astype(float)
    assert seed_row_bootstrap(a * tok, tok, 10, 0)["value"] == pytest.approx(float(np.mean((a * tok).sum(1) / tok.sum(1))))
    # a large per-row difference shared by both arms cancels when paired: a shift of 0.05 is shown, though each arm's
    # own interval is far wider than that
    shifted = a + 0.05 + rng.normal(0, 0.01, a.shape)
    d = paired_difference(shifted, den, a, den, 500, 0)
    assert d["difference"] == pytest.approx(0.05, abs=0.01) and d["excludes_zero"] and d["ci95"][0] > 0
    assert b["ci95"][1] - b["ci95"][0] > 0.15
    same = paired_difference(a, den, a + rng.normal(0, 0.3, a.shape), den, 500, 0)
    assert not same["excludes_zero"] and same["ci95"][0] < 0 < same["ci95"][1]
    assert paired_difference(a[:, :0], den[:, :0], a[:, :0], den[:, :0], 500, 0)["ci95"] is None


def fake_cell(tmp: Path, selection: str, budget, seed: int, losses: np.ndarray, points=None, valid=True) -> dict:
    """A cell record whose eval directory holds per-row losses (and judgments)."""
    d = tmp / f"{selection}-{budget}-s{seed}".replace(" ", "-")
    d.mkdir(parents=True)
    (d / "losses.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "status": "ok", "loss": float(x), "n_tokens": 10}) + "\n"
                                            for i, x in enumerate(losses)))
    judge = None
    if points is not None:
        (d / "judgments.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "points_model_first": float(p), "points_model_second": float(p)})
                                                   + "\n" for i, p in enumerate(points)))
        judge = {"valid": valid, "win_rate": float(np.mean(points)) if valid else None, "invalid_reasons": [] if valid else ["position bias"]}
    return {"cell": d.name, "selection": selection, "budget": budget, "seed": seed, "curation": {"selected": 3, "export_tokens": 100},
            "train": {"steps": 2, "tokens_trained": 200, "tokens_trained_from": "trainer", "first_loss": 1.0, "last_loss": 0.9},
            "eval": {"dir": str(d), "loss": {"loss": float(losses.mean())}, "judge": judge, "generation": {}}}


def test_differences_are_called_only_when_the_paired_interval_excludes_zero(tmp_path):
    from curate.compare import CompareSpec, differences, markdown, table

    spec = CompareSpec(name="t", flow="f.yaml", budgets=[5], seeds=[0, 1, 2], selections=[{"name": "good", "select": [{"method": "random", "budget": 5}]}],
                       eval={"eval_set": EVAL_SET, "bootstrap": 400})
    spec.path = str(tmp_path / "c.yaml")
    rng = np.random.default_rng(0)
    base_rows = rng.uniform(1.0, 3.0, 40)  # per-row difficulty, shared by every model
    cells = []
    for s in spec.seeds:
        noise = lambda: rng.normal(0, 0.02, 40)  # noqa: E731
        cells.append(fake_cell(tmp_path, "base model", None, s, base_rows + 0.3, rng.uniform(0, 1, 40) > 0.7))
        cells.append(fake_cell(tmp_path, "good", 5, s, base_rows - 0.1 + noise(), rng.uniform(0, 1, 40) > 0.3))
        cells.append(fake_cell(tmp_path, "random", 5, s, base_rows + noise(), rng.uniform(0, 1, 40) > 0.5))
        cells.append(fake_cell(tmp_path, "same", 5, s, base_rows + noise(), rng.uniform(0, 1, 40) > 0.5))
        cells.append(fake_cell(tmp_path, "invalid", 5, s, base_rows + 0.2 + noise(), rng.uniform(0, 1, 40) > 0.5, valid=s != 1))
    diffs = differences(spec, cells)
    got = {(d["selection"], d["against"], d["metric"]): d for d in diffs}
    assert got[("good", "random", "eval_loss")]["verdict"] == "better"
    assert got[("good", "random", "eval_loss")]["difference"] == pytest.approx(-0.1, abs=0.02)
    assert got[("good", "base model", "eval_loss")]["verdict"] == "better"
    assert got[("invalid", "random", "eval_loss")]["verdict"] == "worse"
    assert got[("same", "random", "eval_loss")]["verdict"] == "no difference shown"
    assert got[("random", "base model", "eval_loss")]["verdict"] == "better" and ("random", "random", "eval_loss") not in got
    assert got[("good", "random", "win_rate")]["verdict"] == "better"
    assert ("invalid", "random", "win_rate") not in got  # the judge is not valid in one of its seeds: no win-rate difference
    assert all(d["n_rows"] == 40 and d["n_seeds"] == 3 and len(d["per_seed"]) == 3 for d in diffs)
    rows = {r["selection"]: r for r in table(spec, cells, diffs)}
    assert list(rows) == ["base model", "good", "random", "same", "invalid"]
    assert rows["good"]["loss_vs_random"] == "better" and rows["same"]["loss_vs_random"] == "no difference shown"
    assert rows["base model"]["loss_vs_random"] is None and rows["base model"]["budget"] is None and rows["good"]["seeds"] == 3
    assert rows["invalid"]["judge"] == "NOT VALID" and rows["invalid"]["win_rate"] is None and rows["good"]["judge"] == "valid"
    lo, hi = (float(x) for x in rows["good"]["eval_loss_ci95"].split("–"))
    assert lo < rows["good"]["eval_loss"] < hi
    md = markdown(spec, list(rows.values()), cells, diffs)
    assert "## Paired differences" in md and "| 5 | good | random | eval_loss |" in md and "no difference shown" in md


# -- end to end -------------------------------------------------------------------------------------------


def test_token_budget_gives_every_cell_the_same_steps_and_the_same_tokens(pool_flow, tmp_path):
    """Shortest-first and longest-first rows at one token budget: different row counts, the same optimizer steps,
    the budget counted in the trainer's tokens (the chat_tokens scorer compare adds), every row trained once a
    pass, so the tokens trained are each selection's tokens × the epochs, within the shortest row of the budget.
    Baselines turned off: only the two selections."""
    from curate.compare import load_compare
    from curate.compare_flow import run_compare

    spec = load_compare(compare_file(tmp_path, pool_flow, budget_unit="tokens", budgets=[1600],
                                     selections=[by_length("short", False), by_length("long", True)],
                                     baselines={"random": False, "base_model": False},
                                     train={"epochs": 1, "batch_tokens": 800, "max_length": 512},
                                     eval={**FAST_EVAL, "judge": None}))
    res = run_compare(spec)
    rows = {r["selection"]: r for r in res["table"]}
    assert list(rows) == ["short", "long"]  # no random, no base model
    steps = round(1 * 1600 / 800)
    assert rows["short"]["train_steps"] == rows["long"]["train_steps"] == steps
    assert rows["short"]["selected"] > rows["long"]["selected"] >= 2  # the same budget holds more short rows
    cells = {c["selection"]: c for c in res["cells"]}
    for name, c in cells.items():
        rec = json.loads((Path(c["train"]["dir"]) / "train.json").read_text())
        assert rec["steps"] == steps and rec["config"]["max_steps"] == steps and rec["config"]["steps_per_epoch"] == steps
        cur = json.loads((tmp_path / "out" / "cells" / f"{name}-1600" / "curation.json").read_text())
        budgeted = [st for st in cur["steps"] if st["method"] == "token_budget"][0]
        # the step counted what the trainer counts, and the trainer saw every row once: tokens trained = the selection's
        assert budgeted["tokens_kept"] == cur["export_tokens"] == c["train"]["tokens_trained"] == rows[name]["selected_tokens"]
        assert rec["batch"]["rows_per_step"] == -(-rows[name]["selected"] // steps)
        # fill: every row left out is longer than the room it left, so the selection is within its shortest left-out row
        import polars as pl
        import re

        ledger = pl.read_parquet(tmp_path / "out" / "cells" / f"{name}-1600" / "run" / "ledger.parquet")
        left = [int(re.search(r"; (\d+) tokens do not fit", d).group(1)) for d in ledger.filter(pl.col("reason") == "over_token_budget")["detail"]]
        assert left and 1600 - min(left) < rows[name]["train_tokens"] <= 1600, (name, rows[name]["train_tokens"], sorted(left)[:3])
    run = json.loads((tmp_path / "out" / "cells" / "short-1600" / "run" / "run.json").read_text())
    assert run["fingerprints"]["score:chat_tokens"]["params"]["model"] == "smollm2-135m-instruct"  # compare added the trainer's count
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["long-1600", "long-1600-s0", "short-1600", "short-1600-s0"]
    info = json.loads((out / "compare.json").read_text())["budgets"][0]
    assert info["train_steps"] == steps and info["unit"] == "tokens"
    md = (out / "compare.md").read_text()
    assert "budgets in tokens" in md and "train_tokens" in md and "## Paired differences" not in md


def test_seeds_baselines_and_paired_differences_end_to_end(pool_flow, tmp_path):
    """Rows budget, two seeds, the default baselines: per-seed cells with their own train seed, one row per
    selection with a mean and an interval over rows and seeds, the random and base-model rows, paired differences;
    every cell of the budget trains the least natural step count; a re-run runs nothing."""
    from curate.compare import load_compare, natural_steps
    from curate.compare_flow import run_compare

    cfile = compare_file(tmp_path, pool_flow, budgets=[3], seeds=[0, 1], selections=[by_length("short", False, "rows")],
                         train={"epochs": 1, "batch_tokens": 256, "max_length": 256}, eval={**FAST_EVAL, "judge": None})
    spec = load_compare(cfile)
    res = run_compare(spec)
    out = tmp_path / "out"
    table = res["table"]
    assert [(r["selection"], r["budget"], r["seeds"]) for r in table] == [("base model", None, 2), ("short", 3, 2), ("random", 3, 2)]
    info = json.loads((out / "compare.json").read_text())
    steps = info["budgets"][0]["train_steps"]
    assert steps == min(natural_steps(spec, t) for t in info["budgets"][0]["export_tokens"].values())
    assert len(set(info["budgets"][0]["export_tokens"].values())) == 2  # the selections differ in tokens, not in steps
    rows = {r["selection"]: r for r in table}
    assert rows["short"]["train_steps"] == rows["random"]["train_steps"] == steps and rows["base model"]["train_steps"] == 0
    for sel in ("short", "random"):
        for seed in (0, 1):
            cell = json.loads((out / "cells" / f"{sel}-3-s{seed}" / "cell.json").read_text())
            rec = json.loads((Path(cell["train"]["dir"]) / "train.json").read_text())
            assert rec["config"]["seed"] == seed and cell["seed"] == seed and rec["steps"] == steps
            assert json.loads((Path(cell["eval"]["dir"]) / "eval.json").read_text())["spec"]["seed"] == seed
    # the seeds train different adapters from the same export
    s0, s1 = (json.loads((out / "cells" / f"short-3-s{s}" / "cell.json").read_text()) for s in (0, 1))
    assert s0["curation"]["output_dir"] == s1["curation"]["output_dir"] and s0["train"]["key"] != s1["train"]["key"]
    assert (out / "cells" / "base-model-s0" / "eval" / "losses.jsonl").exists()
    # one row per selection: the mean over the seeds with an interval over rows and seeds
    per_seed = [r for r in info["per_seed"] if r["selection"] == "short"]
    assert [r["seed"] for r in per_seed] == [0, 1]
    assert rows["short"]["eval_loss"] == pytest.approx(np.mean([r["eval_loss"] for r in per_seed]), abs=1e-3)
    assert all(r["eval_loss_ci95"] for r in table)
    # paired differences against random and the base model (no judge here: loss only)
    got = {(d["selection"], d["against"], d["metric"]) for d in res["differences"]}
    assert got == {("short", "random", "eval_loss"), ("short", "base model", "eval_loss"), ("random", "base model", "eval_loss")}
    assert all(d["verdict"] in ("better", "worse", "no difference shown") and d["n_seeds"] == 2 and d["n_rows"] == 2 for d in res["differences"])
    assert all((d["verdict"] != "no difference shown") == (d["ci95"][0] > 0 or d["ci95"][1] < 0) for d in res["differences"])
    md = (out / "compare.md").read_text()
    assert "## Paired differences" in md and "| base model |" in md and "resamples the eval rows" not in md
    assert "draws the eval rows and the seeds with replacement" in md and (out / "compare.png").stat().st_size > 0
    # a re-run: every cell and curation recorded, nothing runs again
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name in ("cell.json", "curation.json")}
    assert len(stamp) == 8
    run_compare(load_compare(cfile))
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_settings_added_later_leave_recorded_cells_their_keys():
    """A cell key hashes the train and eval settings without the ones added after cells were first recorded while
    they are at their default (TrainSpec.steps_per_epoch; the eval set's delimiter, keep_columns, license): a
    user's recorded cells are not run again after an upgrade; set, they are in the key."""
    from curate.compare import HOW, TRAIN_HOW, key_dump
    from curate.evaluate.spec import EvalSpec
    from curate.train.spec import TrainSpec

    ev = key_dump(EvalSpec(eval_set=EVAL_SET), HOW)
    assert ev["eval_set"] == {k: v for k, v in EvalSpec(eval_set=EVAL_SET).model_dump(mode="json")["eval_set"].items()
                              if k not in ("delimiter", "keep_columns", "license")}
    assert "steps_per_epoch" not in key_dump(TrainSpec(), TRAIN_HOW)
    assert key_dump(TrainSpec(steps_per_epoch=2), TRAIN_HOW)["steps_per_epoch"] == 2
    assert key_dump(EvalSpec(eval_set={**EVAL_SET, "keep_columns": "all"}), HOW)["eval_set"]["keep_columns"] == "all"


def test_compare_without_prefect_does_not_import_prefect():
    """``curate compare --no-prefect`` loads neither Prefect nor its settings (seconds of start-up): the CLI and the
    compare flow module import it only when a flow run is asked for."""
    import subprocess
    import sys

    code = "import sys, curate.cli, curate.compare_flow; print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]
