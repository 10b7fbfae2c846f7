"""Export of a large selection: the record-set export against the code before it (issue 9).

    .venv/bin/python bench/export_selected.py [--rows 100000] [--budget 50000] [--old REV]

Builds an alpaca JSONL of ``--rows`` real rows (Code Alpaca from ../shared/data, repeated with a
distinct id line per copy), then runs the same in-process flow (heuristic scorer, top-k ``--budget``
rows, every export layout as JSONL and Parquet) twice in fresh processes: with this checkout's code,
and with the code at ``--old`` (a temporary git worktree; default: the commit before record sets).
Both share one store, so scoring is paid once and the export stage is what differs. Reports each
version's export-stage seconds (from run.json), the ratio, and checks that the exported files are
byte-identical.

Before record sets, export re-read every ingest shard in full once per layout and once more for the
sidecar; now the selection round writes the kept rows as a record set (filtered shard by shard with
Arrow) and export reads only that.
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

from common import ROOT, write_result  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "codealpaca"
OLD_DEFAULT = "022df962f34144084873e8fd3955d5f774a6ea0f"  # main before record sets (embedders registry commit)


def build_input(path: Path, n: int) -> None:
    rows = []
    for name in ("new_codealpaca.json", "code_alpaca_2k.json"):
        for r in json.loads((SHARED / name).read_text()):
            rows.append({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]})
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = rows[i % len(rows)]
            copy = i // len(rows)
            instruction = r["instruction"] if copy == 0 else f"{r['instruction']}\n(variant {copy})"
            f.write(json.dumps({**r, "instruction": instruction}) + "\n")


def flow_file(folder: Path, budget: int) -> Path:
    import yaml

    spec = {"name": "export-bench", "inputs": [{"path": "rows.jsonl", "format": "alpaca"}], "ingest": {"shard_size": 10000},
            "score": [{"method": "heuristic"}], "select": [{"method": "top_k", "score": "heuristic.response_tokens", "budget": budget}],
            "export": {"layouts": ["messages", "prompt_completion", "alpaca", "sharegpt"], "file_types": ["jsonl", "parquet"]},
            "report": {"enabled": False}, "runtime": {"prefect": False, "progress": False, "torch_threads": 1}}
    path = folder / "flow.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(code: Path, flow: Path, out: Path, store: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "CURATE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "curate", "run", str(flow), "--set", f"output_dir={out}", "--set", f"store_dir={store}"],
                   cwd=code, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "run.json").read_text())
    summary["wall"] = time.perf_counter() - t0
    return summary


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--budget", type=int, default=50_000)
    ap.add_argument("--old", default=OLD_DEFAULT)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="curate-export-bench-"))
    build_input(tmp / "rows.jsonl", args.rows)
    flow = flow_file(tmp, args.budget)
    old = tmp / "old-code"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), args.old], cwd=ROOT, check=True)
    try:
        store = tmp / "store"
        run(ROOT, flow, tmp / "warm", store)  # pays ingest and scoring once; both timed runs read the store
        old_run = run(old, flow, tmp / "out-old", store)
        new_run = run(ROOT, flow, tmp / "out-new", store)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    sec = {name: {s["stage"]: s["seconds"] for s in r["stages"]} for name, r in (("old", old_run), ("new", new_run))}
    d_old, d_new = digest(tmp / "out-old" / "export"), digest(tmp / "out-new" / "export")
    differ = sorted(k for k in d_old.keys() | d_new.keys() if d_old.get(k) != d_new.get(k))
    same_data = not [k for k in differ if k.endswith((".jsonl", ".parquet"))]
    head = (f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load average "
            f"{os.getloadavg()[0]:.2f}. {args.rows:,} alpaca rows (Code Alpaca repeated), top-k {args.budget:,} selected, "
            "4 layouts × JSONL + Parquet, store warm. Old code: " + args.old[:10] + ".")
    both = {k: v["export"] + v["select"] for k, v in sec.items()}  # the selection now writes the kept rows export reads
    lines = [head, "", "| code | export s | select s | select + export s | ingest s | whole run s (process) |", "|---|---|---|---|---|---|",
             *(f"| {label} | {sec[k]['export']:.1f} | {sec[k]['select']:.1f} | {both[k]:.1f} | {sec[k].get('ingest', 0):.1f} | {r['wall']:.1f} |"
               for label, k, r in (("before record sets", "old", old_run), ("record sets", "new", new_run))), "",
             f"Export {sec['old']['export'] / sec['new']['export']:.2f}× faster; select + export {both['old'] / both['new']:.2f}×. "
             f"Export data files byte-identical: {same_data}; files that differ: {', '.join(differ) or 'none'}."]
    write_result("export_selected", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
