"""Heuristic scorer speed: the columnar scorer alone, its per-row reference alone, and the whole score
stage (``score_shard``: read, score, build the store table, write, mark done) on the shards of a record set.

    .venv/bin/python bench/heuristic_speed.py RECORDSET_DIR [--rows N] [--reference-rows N]

RECORDSET_DIR is ``<output_dir>/recordsets/input`` of a run (e.g. one of the scale flow over
``tests/scale_rows.write_scale_pool`` rows). Prints rows/s as wall time and as this process's CPU time
(the CPU figure is steadier on a shared machine), and checks the two scorers agree on the rows timed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.config import StepSpec  # noqa: E402
from curate.manifests import RecordSetRef  # noqa: E402
from curate.scorers import ScorerContext  # noqa: E402
from curate.scorers.heuristic import HeuristicScorer, _reference_scores, _table  # noqa: E402
from curate.stages.score import score_shard  # noqa: E402


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recordset", type=Path)
    ap.add_argument("--rows", type=int, default=None, help="rows of the set to use (default: all)")
    ap.add_argument("--reference-rows", type=int, default=8192, help="rows for the per-row reference (slow)")
    args = ap.parse_args()
    ref = RecordSetRef.model_validate_json((args.recordset / "manifest.json").read_text())
    shards = ref.shards
    if args.rows:
        keep, total = [], 0
        for s in shards:
            if total >= args.rows:
                break
            keep.append(s)
            total += s.n_rows
        shards = keep
    n = sum(s.n_rows for s in shards)
    scorer = HeuristicScorer("heuristic", {})
    _, w, c = timed(_table)
    print(f"lookup table (once per process): {w:.2f} s")
    table = pa.concat_tables(pq.read_table(s.path, columns=["sample_id", "messages"]) for s in shards)
    step = scorer.table_rows

    def fast():
        return [scorer.score_table(table.slice(i, step)) for i in range(0, n, step)]

    cols, w, c = timed(fast)
    print(f"scorer (columnar)    {n:>8} rows: {n / w:>8.0f} rows/s wall, {n / c:>8.0f} rows/s CPU")
    m = min(n, args.reference_rows)
    records = table.slice(0, m).to_pylist()
    want, w, c = timed(lambda: _reference_scores(records, scorer.params, scorer._count_tokens))
    print(f"scorer (reference)   {m:>8} rows: {m / w:>8.0f} rows/s wall, {m / c:>8.0f} rows/s CPU")
    got = [s for part in cols for s in part.to_scores(scorer.outputs)][:m]
    same = all(g.values == r.values and g.components == r.components for g, r in zip(got, want))
    print(f"columnar == reference on {m} rows: {same}")
    with tempfile.TemporaryDirectory() as store:
        spec = StepSpec(method="heuristic")

        def stage():
            return [score_shard(s, spec, scorer.key, store, ScorerContext()) for s in shards]

        refs, w, c = timed(stage)
        print(f"score stage          {n:>8} rows: {n / w:>8.0f} rows/s wall, {n / c:>8.0f} rows/s CPU "
              f"({sum(r.computed_rows for r in refs)} computed)")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
