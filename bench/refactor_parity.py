"""Byte-identical selections, ledgers and exports before and after a behaviour-preserving refactor (issue 23).

    .venv/bin/python bench/refactor_parity.py [--before REV] [--after REV] [--flows select,smart,...] [--keep DIR]

Issue 23 reorganises curate (stages, store paths, the ingest/AIDE split, the plug-in contract) with its
outputs unchanged. This runs every flow in ``flows/`` twice, once with each version of the code, and
compares what they produced:

- ``--before REV`` (default ``56fa9d3``, main when issue 23 started) runs from a ``git worktree add
  --detach`` under a temp dir; ``--after`` is this checkout's working tree as it is now (uncommitted
  edits included), or a REV (another temp worktree). The worktrees are removed at the end. Each run is
  its own process, ``python -m curate run FLOW --no-prefect`` with ``PYTHONPATH`` at that version's
  code (checked: ``curate.__file__`` must lie in it).
- The flows are the before revision's ``flows/*.yaml`` (both versions run the same files, over the same
  data files), cut to a few rows with the overrides tests/test_shipped_flows.py uses: its ``CUTS``
  (``SELECT_CUT`` for select.yaml), read from the before revision's test file with ``ast.literal_eval``
  (no import: importing the test module would import whichever curate is on the path, mid-edit or not).
  A flow that ``CUTS`` does not name runs as shipped. ``runtime.progress=false``.
- ``flows/compare.yaml`` is a compare config, not a flow: its pool flow (its ``flow:``, select.yaml, with
  ``SELECT_CUT`` less its ``select.`` item) runs once per compared selection — the file's ``selections``
  and the random baseline compare adds (``baselines``) — with that selection's ``select:`` steps and
  ``{budget}`` expanded with the first budget; with ``budget_unit: tokens`` the pool also gets the
  ``chat_tokens`` scorer of ``train.model`` and every ``token_budget`` step counts with it, as compare's
  cells do. That is what compare's cells curate: the training and evaluation of the cells are NOT part
  of this parity (they are not byte-reproducible across processes on a CPU and take minutes); their
  inputs, the selections and export files, are.
- Before runs first, then after, with ONE store per flow (per compare config), so models score once:
  the after-run should compute nothing. Its run.json's ``stages`` say what was computed (score/embed/
  rewrite rows, ingest chunks read again); a recomputation means a store key changed, which the
  refactor must not do (the column "after-run cached?").

Compared per flow (rows of the rewrite flows — reflection, aide, mosaic — included: their derived rows
are in the derived ledger and the export files):

- the selected sample ids in order (rank), per round: the input rows' selection (ledger.parquet) and,
  for a flow with a rewrite stage, the derived rows' (derived_ledger.parquet);
- the ledger: sha256 of the sorted (round, sample_id, outcome, reason) rows of both ledgers;
- the sha256 of every export data file (``.jsonl``, ``.parquet``; bench/spine_parity.export_digest) and
  of the trainer sidecars (dataset_info.json, axolotl_datasets.yaml, trl_load.py), and of the dataset card
  ``export/README.md`` less its ``- curate <version>`` line; manifest.json (times, versions) is left out.

Writes bench/results/refactor_parity.md (also printed) and exits 1 if anything differs, a run failed, or
the after-run computed something (a changed store key).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from common import ROOT, write_result
from spine_parity import export_digest, selected_ids

ISSUE_START = "56fa9d3"  # main when issue 23 started
WORKTREE = "worktree"  # --after's default: this checkout as it is now


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def test_cuts(code: Path) -> tuple[dict[str, list[str]], list[str]]:
    """``CUTS`` ({flow name: overrides}) and ``SELECT_CUT`` as ``code``'s tests/test_shipped_flows.py spells them."""
    tree = ast.parse((code / "tests" / "test_shipped_flows.py").read_text(encoding="utf-8"))
    found: dict[str, Any] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(target, ast.Name) and target.id in ("CUTS", "SELECT_CUT"):
            found[target.id] = ast.literal_eval(node.value)
    return {Path(k).stem: v for k, v in found["CUTS"].items()}, found["SELECT_CUT"]


def with_budget(node: Any, budget: int | float) -> Any:
    """``{budget}`` replaced as curate compare does: a value that is only ``{budget}`` becomes the number."""
    if isinstance(node, str) and "{budget}" in node:
        return budget if node.strip() == "{budget}" else node.replace("{budget}", str(budget))
    if isinstance(node, dict):
        return {k: with_budget(v, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [with_budget(v, budget) for v in node]
    return node


def compare_jobs(path: Path, select_cut: list[str]) -> list[tuple[str, Path, list[str]]]:
    """(label, pool flow file, overrides) for each selection a compare config's cells curate, at its first budget."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    pool = (path.parent / spec["flow"]).resolve()
    budget = spec["budgets"][0]
    tokens = spec.get("budget_unit", "rows") == "tokens"
    sels = [(s["name"], s["select"]) for s in spec["selections"]]
    base = spec.get("baselines") or {}
    if base.get("random", True) and all(name != "random" for name, _ in sels):  # the baseline curate compare adds
        before = list(base.get("random_before") or [])
        draw = ([{"method": "random", "budget": 1.0, "rate_base": "pool"}, {"method": "token_budget", "tokens": "{budget}", "fill": True}]
                if tokens else [{"method": "random", "budget": "{budget}"}])
        sels.append(("random", before + draw))
    extra = []
    if tokens:  # compare's chat_tokens scorer: the training model's chat template, cut at the training max_length
        train = spec.get("train") or {}
        max_length = train.get("max_length") or ((yaml.safe_load(pool.read_text(encoding="utf-8")).get("export") or {}).get("max_length"))
        scorer = {"method": "chat_tokens", "model": train["model"], **({"max_length": max_length} if max_length else {}),
                  **({"revision": train["revision"]} if train.get("revision") else {})}
        extra = [f"score[+]={json.dumps(scorer)}"]
    cut = list(spec.get("set") or []) + [o for o in select_cut if not o.startswith("select")] + extra
    jobs = []
    for name, steps in sels:
        steps = with_budget(steps, budget)
        if tokens:
            steps = [{**st, "count": ["chat_tokens.tokens"]} if st["method"] == "token_budget" and "count" not in st else st
                     for st in steps]
        jobs.append((f"{path.stem}:{name}", pool, [*cut, f"select={json.dumps(steps)}", "report.plots=false"]))
    return jobs


def flow_jobs(code: Path, names: list[str] | None) -> list[tuple[str, str, Path, list[str]]]:
    """(group, label, flow file, overrides) for every flow file of ``code`` (or those ``names`` picks); the group
    (the flow file's name) picks the store: a compare config's selections share theirs."""
    cuts, select_cut = test_cuts(code)
    files = sorted((code / "flows").glob("*.yaml"))
    have = {p.stem for p in files}
    if names:
        missing = sorted(set(names) - have)
        if missing:
            sys.exit(f"--flows: no flows/{', '.join(missing)}.yaml in the before revision (it has {', '.join(sorted(have))})")
        files = [code / "flows" / f"{n}.yaml" for n in names]
    jobs = []
    for path in files:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if "selections" in spec and "flow" in spec:  # a compare config
            jobs += [(path.stem, label, pool, o) for label, pool, o in compare_jobs(path, select_cut)]
        else:
            jobs.append((path.stem, path.stem, path, select_cut if path.stem == "select" else cuts.get(path.stem, [])))
    return jobs


def env_for(code: Path, tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code), "CURATE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PREFECT_HOME": str(tmp / "prefect")}


def check_code(code: Path, tmp: Path) -> None:
    """``curate`` imports from ``code`` (not from an installed copy)."""
    where = subprocess.run([sys.executable, "-c", "import curate; print(curate.__file__)"], cwd=code, env=env_for(code, tmp),
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(code.resolve()):
        sys.exit(f"PYTHONPATH={code}: curate imports from {where}, not from that code")


def run(code: Path, flow: Path, overrides: list[str], out: Path, store: Path, tmp: Path) -> tuple[float, dict]:
    """One in-process run of ``flow`` with ``code``: (seconds, run.json)."""
    cmd = [sys.executable, "-m", "curate", "run", str(flow), "--no-prefect"]
    for item in [*overrides, f"output_dir={out}", f"store_dir={store}", "runtime.progress=false"]:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env=env_for(code, tmp), capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if proc.returncode or not (out / "run.json").is_file():
        raise RuntimeError(f"exit {proc.returncode} after {secs:.0f} s\n{(proc.stderr or proc.stdout)[-3000:]}")
    return secs, json.loads((out / "run.json").read_text())


def rounds(out: Path, summary: dict) -> dict[str, list[str]]:
    """Selected sample ids in rank order: ``select`` (input rows) and, with a rewrite stage, ``derived``."""
    import pyarrow.parquet as pq

    res = {"select": selected_ids(out)}
    derived = out / "derived_ledger.parquet"
    if summary.get("derived") is not None and derived.is_file():
        table = pq.read_table(derived, columns=["row", "sample_id", "outcome", "rank"]).to_pylist()
        rows = [r for r in table if r["outcome"] == "selected"]
        res["derived"] = [r["sample_id"] for r in sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0, r["row"]))]
    return res


def ledger_digest(out: Path) -> tuple[int, str]:
    """(rows, sha256 of the sorted (ledger, sample_id, outcome, reason) rows of ledger.parquet and derived_ledger.parquet)."""
    import pyarrow.parquet as pq

    rows = []
    for name in ("ledger", "derived_ledger"):
        path = out / f"{name}.parquet"
        if path.is_file():
            t = pq.read_table(path, columns=["sample_id", "outcome", "reason"]).to_pydict()
            rows += [(name, s or "", o or "", r or "") for s, o, r in zip(t["sample_id"], t["outcome"], t["reason"])]
    return len(rows), hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


#: the export's trainer sidecars (no times, versions or paths in them): compared whole
SIDECARS = ("dataset_info.json", "axolotl_datasets.yaml", "trl_load.py")


def files_digest(out: Path) -> dict[str, str]:
    """sha256 of the export's data files, its trainer sidecars, and its dataset card less the curate-version line."""
    digest = export_digest(out)
    digest.update({name: hashlib.sha256((out / "export" / name).read_bytes()).hexdigest() for name in SIDECARS
                   if (out / "export" / name).is_file()})
    card = out / "export" / "README.md"
    if card.is_file():
        lines = [ln for ln in card.read_text(encoding="utf-8").splitlines() if not ln.startswith("- curate ")]
        digest["README.md (less its version line)"] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return digest


def work_done(summary: dict) -> str:
    """What a run computed, from run.json's ``stages``: "all cached", "computed: …", or "unknown" when it does not say."""
    said, done = False, []
    for st in summary.get("stages") or []:
        if "computed_rows" in st:
            said = True
            if st["computed_rows"]:
                done.append(f"{st['stage']} {st['computed_rows']} rows")
        if "chunks" in st and "chunks_cached" in st:
            said = True
            if st["chunks_cached"] < st["chunks"]:
                done.append(f"{st['stage']} read {st['chunks'] - st['chunks_cached']} of {st['chunks']} chunks")
    if not said:
        return "unknown (run.json does not say)"
    return "yes" if not done else "NO: " + "; ".join(done)


def selection_diff(before: dict[str, list[str]], after: dict[str, list[str]]) -> str:
    """How two runs' selections (``rounds``) differ, per round: how many ids are in one only, or the same ids reordered."""
    notes = []
    for k in sorted(set(before) | set(after)):
        b, a = before.get(k, []), after.get(k, [])
        if b != a:
            notes.append(f"{k}: same ids, other order" if set(b) == set(a) else f"{k}: {len(set(b) ^ set(a))} ids differ")
    return "; ".join(notes)


def describe(rev: str) -> str:
    if rev == WORKTREE:
        dirty = len([ln for ln in git("status", "--porcelain", "--untracked-files=no").splitlines() if ln.strip()])
        return f"this checkout's working tree (HEAD {git('rev-parse', '--short', 'HEAD')}, {dirty} tracked files edited)"
    return f"{rev} ({git('rev-parse', '--short', rev + '^{commit}')})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=ISSUE_START, help="git revision of the code before (default: %(default)s, issue 23's start)")
    ap.add_argument("--after", default=WORKTREE,
                    help="git revision of the code after (default: this checkout's working tree, edits included)")
    ap.add_argument("--flows", default="", help="comma-separated flow names (flows/<name>.yaml of the before revision; default: all)")
    ap.add_argument("--keep", type=Path, help="keep the outputs and stores in this folder (default: a temp dir, removed)")
    args = ap.parse_args()
    before_desc, after_desc = describe(args.before), describe(args.after)
    tmp = Path(tempfile.mkdtemp(prefix="curate-refactor-parity-"))
    work = args.keep.resolve() if args.keep else tmp / "runs"
    work.mkdir(parents=True, exist_ok=True)
    codes: dict[str, Path] = {}
    trees: list[Path] = []
    failed = False
    lines = []
    try:
        for label, rev in (("before", args.before), ("after", args.after)):
            if rev == WORKTREE:
                codes[label] = ROOT
                continue
            codes[label] = tmp / f"code-{label}"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(codes[label]), rev], cwd=ROOT, check=True)
            trees.append(codes[label])
        for code in codes.values():
            check_code(code, tmp)
        jobs = flow_jobs(codes["before"], [n for n in args.flows.split(",") if n] or None)
        lines += [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; load average at the start "
                  f"{os.getloadavg()[0]:.2f}. before = {before_desc}; after = {after_desc}. Flows: the before revision's flows/*.yaml "
                  "cut as tests/test_shipped_flows.py cuts them, run in-process (--no-prefect), before then after, one store per flow.",
                  "", "| flow | rows | selected | selection equal | ledger equal | export files equal (n) | s before | s after | "
                  "after-run cached? |", "|---|---|---|---|---|---|---|---|---|"]
        for group, label, flow, overrides in jobs:
            safe = label.replace(":", "-")
            res: dict[str, Any] = {}
            for side, code in codes.items():
                out = work / f"out-{safe}-{side}"
                shutil.rmtree(out, ignore_errors=True)
                try:
                    secs, summary = run(code, flow, overrides, out, work / f"store-{group}", tmp)
                except RuntimeError as exc:
                    print(f"{label} {side}: FAILED {exc}", flush=True)
                    res[side] = exc
                    break
                res[side] = (secs, summary, rounds(out, summary), ledger_digest(out), files_digest(out))
                print(f"{label} {side}: {secs:.1f} s, {work_done(summary)}", flush=True)
            if any(isinstance(r, Exception) for r in res.values()) or len(res) < 2:
                failed = True
                which = ", ".join(side for side, r in res.items() if isinstance(r, Exception))
                lines.append(f"| {label} | | | FAILED ({which}) | | | | | |")
                print(lines[-1], flush=True)
                continue  # the table is saved after the next flow or at the end
            b, a = res["before"], res["after"]
            same_sel, same_ledger, same_files = b[2] == a[2], b[3] == a[3], b[4] == a[4] and bool(b[4])
            cached = work_done(a[1])
            failed |= not (same_sel and same_ledger and same_files) or cached.startswith("NO")  # a store key changed
            sel_note = "" if same_sel else f" ({selection_diff(b[2], a[2])})"
            file_note = "" if same_files else " differ: " + ", ".join(sorted(k for k in set(b[4]) | set(a[4])
                                                                              if b[4].get(k) != a[4].get(k)))
            rows_note = f"{b[1]['n_input']} + {b[1]['derived']['n_derived']} derived" if b[1].get("derived") else str(b[1]["n_input"])
            selected = " + ".join(str(len(v)) for v in b[2].values())
            lines.append(f"| {label} | {rows_note} | {selected} | {same_sel}{sel_note} | {same_ledger} ({b[3][0]} rows) | {same_files} "
                         f"({len(b[4])}){file_note} | {b[0]:.0f} | {a[0]:.0f} | {cached} |")
            print(lines[-1], flush=True)
            (ROOT / "bench" / "results" / "refactor_parity.md").write_text("\n".join([*lines, "", "(partial: the run goes on)"]) + "\n")
    finally:
        for tree in trees:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    lines += ["", "selected: the selected rows per round (input rows + derived rows for a flow with a rewrite stage). "
              f"Load average at the end: {os.getloadavg()[0]:.2f}." + (f" Outputs kept in {work}." if args.keep else "")]
    write_result("refactor_parity", "\n".join(lines) + "\n")
    if failed:
        print("refactor parity: something differs or failed (see the table)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
