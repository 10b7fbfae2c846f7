"""Does the selection train a better model? Superfiltering-selected rows against random rows, each
LoRA-trained and evaluated — the compare loop (curate.compare) at a size given on the command line.

    # CPU, a toy size (11 min 5 s on the developers' 2-core box, docs/benchmarks.md):
    .venv/bin/python bench/select_train_eval.py --pool ../shared/data/llama_factory/alpaca_en_demo.json \\
        --pool-rows 300 --budget 60 --eval-rows 20 --gen-tokens 96 --out bench/results/select_train_eval_cpu
    # GPU (bench/gpu_check.sh passes the GPU sizes: 1,000 selected vs 1,000 random rows)

Pool rows are scored by Superfiltering (IFD on the same small model that is trained), the
``superfiltering`` selection keeps IFD < 1 and then the top ``budget`` by IFD; ``random`` draws
``budget`` rows (the comparison's automatic baseline). Both are trained (LoRA, ``--epochs``, the same
optimizer steps) and evaluated, and so is the untrained base model: held-out loss on its reference answers (batched masked-CE scoring), greedy answers, and a pairwise judge (the same
small model, verdict-token mode, both answer orders). Writes ``<out>/results.md`` and
``<out>/results.json`` (and into ``--results``) with the table and the throughputs (training tokens/s,
scoring tokens/s, generation tokens/s) from the cells' records, rewritten after every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", nargs="+", required=True, help="Pool files (any layout curate reads).")
    ap.add_argument("--pool-rows", type=int, default=None, help="Rows read per pool file (default: all).")
    ap.add_argument("--budget", type=int, nargs="+", default=[60])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Scored, trained and judging model.")
    ap.add_argument("--eval-set", default=str(ROOT / "data" / "eval" / "alpaca_eval_40.json"))
    ap.add_argument("--eval-rows", type=int, default=20)
    ap.add_argument("--gen-tokens", type=int, default=96)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--dtype", default=None, help="Scoring dtype (default: bfloat16 on GPU, float32 on CPU).")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "select_train_eval"))
    ap.add_argument("--results", default=None, help="A second folder for results.md / results.json (bench/gpu_check.sh: $OUT), "
                    "rewritten after every cell so a run stopped half way keeps what finished.")
    a = ap.parse_args()

    import torch
    import yaml

    from curate.compare import CompareSpec, compare

    gpu = torch.cuda.is_available()
    dtype = a.dtype or ("bfloat16" if gpu else "float32")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool_flow = {
        "name": "pool", "base_dir": "/", "store_dir": str(out / "store"), "output_dir": str(out / "pool"),
        "inputs": [{"path": str(Path(p).resolve()), **({"limit": a.pool_rows} if a.pool_rows else {})} for p in a.pool],
        "ingest": {"shard_size": 2000},
        "score": [{"method": "heuristic"},
                  {"method": "superfiltering", "model": a.model, "max_length": a.max_length, "dtype": dtype}],
        "select": [],
        "export": {"layouts": ["prompt_completion"], "file_types": ["jsonl"], "max_length": a.max_length},
        "report": {"plots": False}, "runtime": {"progress": False, "max_error_rate": 0.05},  # a few prompts longer than max_length
    }
    (out / "pool.yaml").write_text(yaml.safe_dump(pool_flow, sort_keys=False))
    spec = CompareSpec.model_validate({
        "name": "select-train-eval", "flow": "pool.yaml", "budgets": a.budget, "prefect": False, "seeds": [0],
        # the random rows and the untrained base model come as the comparison's automatic baselines
        "selections": [
            {"name": "superfiltering", "select": [
                {"method": "threshold", "score": "heuristic.degenerate", "max": 0},
                {"method": "threshold", "score": "superfiltering.ifd", "max": 1, "max_inclusive": False},
                {"method": "top_k", "score": "superfiltering.ifd", "budget": "{budget}"}]},
        ],
        "train": {"model": a.model, "epochs": a.epochs, "batch_tokens": a.batch_tokens, "max_length": a.max_length},
        "eval": {"eval_set": {"path": str(Path(a.eval_set).resolve()), "limit": a.eval_rows}, "max_length": a.max_length,
                 "dtype": dtype, "generate": {"max_tokens": a.gen_tokens}, "judge": {"model": a.model, "dtype": dtype}},
        "output_dir": str(out / "compare"),
    })
    spec.path = str(out / "compare.yaml")
    machine = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "cpu_count": os.cpu_count(), "platform": platform.platform(),
               "torch": torch.__version__, "dtype": dtype}
    t0 = time.perf_counter()
    targets = [out] + ([Path(a.results).resolve()] if a.results else [])

    def write(cells: list[dict], done: bool = False) -> list[dict]:
        """results.md / results.json from the cells finished so far, into --out and --results (after every cell)."""
        rows = [_row(c) for c in cells]
        wall = time.perf_counter() - t0
        result = {"args": vars(a), "machine": machine, "wall_s": wall, "finished": done, "table": rows}
        cols = list(rows[0]) if rows else []
        md = [f"# select → train → eval ({'GPU: ' + machine['gpu'] if gpu else f'CPU, {os.cpu_count()} cores'})", "",
              f"Pool: {', '.join(a.pool)} ({a.pool_rows or 'all'} rows each); budget {a.budget} rows; model {a.model} ({dtype}); "
              f"eval: {a.eval_rows} rows of {a.eval_set}, {a.gen_tokens} new tokens; wall {wall:.0f} s so far (cached cells included)"
              + ("." if done else f"; {len(rows)} cell(s) finished, the run goes on."), "",
              "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in cols) + " |" for r in rows]
        for d in targets:
            d.mkdir(parents=True, exist_ok=True)
            (d / "results.json").write_text(json.dumps(result, indent=2))
            (d / "results.md").write_text("\n".join(md) + "\n")
        return md

    res = compare(spec, on_cell=write)
    print("\n".join(write(res["cells"], done=True)))
    for d in targets:  # the comparison's own table: means, intervals, paired differences against random and the base model
        (d / "compare.md").write_text((Path(res["output_dir"]) / "compare.md").read_text())


def _row(c: dict) -> dict:
    """One cell's line: its training record (none for the base model) and its evaluation."""
    ev = c["eval"]
    tr = json.loads(Path(c["train"]["dir"], "train.json").read_text()) if c["train"].get("dir") else None
    judge, loss, gen = ev.get("judge") or {}, ev.get("loss") or {}, ev.get("generation") or {}
    return {
        "selection": c["selection"], "rows": c["curation"]["selected"], "train steps": tr["steps"] if tr else 0,
        "train tokens": tr.get("tokens_trained") if tr else 0,
        "train loss (first → last)": f"{tr['first_loss']:.3f} → {tr['last_loss']:.3f}" if tr and tr["first_loss"] is not None else None,
        "train tokens/s": round(tr["tokens_per_s"] or 0) if tr else None, "train s": round(tr["seconds"]) if tr else None,
        "eval loss": None if loss.get("loss") is None else round(loss["loss"], 4),
        "eval ppl": None if loss.get("ppl") is None else round(loss["ppl"], 3),
        "judge": None if not judge else ("valid" if judge.get("valid", True) else "NOT VALID"),
        "win rate": judge.get("win_rate"),
        "scoring tokens/s": round(loss["tokens_per_s"]) if loss.get("tokens_per_s") else None,
        "generation tokens/s": round(gen["tokens_per_s"]) if gen.get("tokens_per_s") else None,
    }


if __name__ == "__main__":
    main()
