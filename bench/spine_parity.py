"""Byte-identical selections and exports before and after the record-set spine (issue 9).

    .venv/bin/python bench/spine_parity.py [--rows-per-input 30] [--flows select,superfilter,...]

For every flow in ``flows/`` as it was before the spine (``BEFORE``), each input capped at
``--rows-per-input`` rows so that every flow runs in minutes on a CPU, the flow runs in-process
(``--no-prefect``) with three versions of the code, each in its own ``git worktree`` and process:

- ``before``: main just before the spine (the embedder-registry commit);
- ``spine``: the spine branch once it was complete, before main's method fixes were merged into it;
- ``today``: this checkout.

All three share one store per flow, so models score once. The selection (selected sample ids in
order, per round) and every export file are hashed. ``before`` vs ``spine`` is the spine's own
check (must be identical); ``today`` differs only where a later issue changed a method on purpose
(the run says which rows differ). Results: bench/results/spine_parity.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import ROOT, write_result  # noqa: E402

BEFORE = "022df962f34144084873e8fd3955d5f774a6ea0f"  # main before record sets
SPINE = "8fc4f5d"  # the spine branch complete (export bench), before merging main's method fixes
DEFAULT_FLOWS = ("select", "superfilter", "deita", "selectit", "smart", "ds2")


def capped_flow(code: Path, name: str, rows: int, folder: Path) -> Path:
    """The flow file as ``code`` has it, each input capped at ``rows`` rows, paths made absolute."""
    spec = yaml.safe_load((code / "flows" / f"{name}.yaml").read_text())
    base = (code / "flows" / spec.get("base_dir", ".")).resolve()
    for inp in spec["inputs"]:
        inp["limit"] = min(int(inp.get("limit") or rows), rows)
        inp["path"] = str((base / inp["path"]).resolve())
    spec["base_dir"] = str(base)
    spec.setdefault("runtime", {})["progress"] = False
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(code: Path, flow: Path, out: Path, store: Path) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(code), "CURATE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "curate", "run", str(flow), "--no-prefect", "--set", f"output_dir={out}",
                           "--set", f"store_dir={store}"], cwd=code, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{code.name} {flow.name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0, json.loads((out / "run.json").read_text())


def export_digest(out: Path) -> dict[str, str]:
    """sha256 of every data file under export/ (the manifest records run times and code versions: left out)."""
    folder = out / "export"
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".jsonl", ".parquet")}


def selected_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    chosen = [r for r in ledger if r["outcome"] == "selected"]
    return [r["sample_id"] for r in sorted(chosen, key=lambda r: (r.get("rank") is None, r.get("rank") or 0, r["row"]))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-per-input", type=int, default=30)
    ap.add_argument("--flows", default=",".join(DEFAULT_FLOWS))
    ap.add_argument("--no-today", action="store_true", help="only before vs spine (today re-scores where later issues changed a scorer's key)")
    ap.add_argument("--result", default="spine_parity", help="name of the results file under bench/results")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="curate-parity-"))
    codes = {"before": tmp / "code-before", "spine": tmp / "code-spine", **({} if args.no_today else {"today": ROOT})}
    for label in ("before", "spine"):
        rev = BEFORE if label == "before" else SPINE
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(codes[label]), rev], cwd=ROOT, check=True)
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. Flows as of "
             f"{BEFORE[:10]}, each input capped at {args.rows_per_input} rows, run in-process; one store per flow. "
             f"before = {BEFORE[:10]}, spine = {SPINE}, today = this checkout.", "",
             "| flow | rows | selected | before = spine: selection | before = spine: export files | today = before: selection | "
             "today = before: export files | s before / spine / today |", "|---|---|---|---|---|---|---|---|"]
    try:
        for name in args.flows.split(","):
            flow = capped_flow(codes["before"], name, args.rows_per_input, tmp)
            res = {}
            for label, code in codes.items():
                out = tmp / f"out-{name}-{label}"
                secs, summary = run(code, flow, out, tmp / f"store-{name}")
                res[label] = (secs, summary, selected_ids(out), export_digest(out))
                print(name, label, f"{secs:.1f}s", len(res[label][2]), "selected", flush=True)
            b, s = res["before"], res["spine"]
            same_sel, same_exp = b[2] == s[2], b[3] == s[3] and bool(b[3])
            if "today" in res:
                t = res["today"]
                diff = "" if t[2] == b[2] else f" ({len(set(t[2]) ^ set(b[2]))} ids differ)"
                today = f"{t[2] == b[2]}{diff} | {t[3] == b[3]} | {b[0]:.0f} / {s[0]:.0f} / {t[0]:.0f}"
            else:
                today = f"not run | not run | {b[0]:.0f} / {s[0]:.0f} / —"
            lines.append(f"| {name} | {sum(b[1]['counts'].values())} | {len(b[2])} | {same_sel} | {same_exp} ({len(b[3])} files) | {today} |")
            print(lines[-1], flush=True)
    finally:
        for label in ("before", "spine"):
            subprocess.run(["git", "worktree", "remove", "--force", str(codes[label])], cwd=ROOT, check=False)
    lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.2f}.")
    write_result(args.result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
