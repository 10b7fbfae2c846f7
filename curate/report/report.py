"""Build the run report (markdown + PNG plots) from the run's own files."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.history import diff_markdown
from curate.io import write_text
from curate.report import plots

SKIP_HIST = {"degenerate", "turns"}


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_cell(x) for x in r) + " |")
    return "\n".join(out)


def _cell(x: Any) -> str:
    """A table cell: one line, pipes escaped, and < & escaped so that data (a `<think>` tag, a file
    name) shows as text in the HTML report instead of becoming markup."""
    return html.escape(str(x), quote=False).replace("|", "\\|").replace("\n", " ")


def _q(v: np.ndarray) -> list[str]:
    v = v[~np.isnan(v)]
    if not len(v):
        return ["–"] * 5
    return [f"{x:.4g}" for x in np.quantile(v, [0, 0.25, 0.5, 0.75, 1])]


def reason_rows(ledger_path: str, limit: int = 25) -> list[list[Any]]:
    """Rows per (outcome, stage, reason) of a ledger file, most frequent first (ties in name order):
    a Polars group-by over a lazy scan of the file."""
    import polars as pl

    counts = (pl.scan_parquet(ledger_path).group_by("outcome", "stage", "reason").len(name="n")
              .sort(["n", "outcome", "stage", "reason"], descending=[True, False, False, False], nulls_last=False).head(limit).collect())
    return [[o, s, r or "", n] for o, s, r, n in counts.iter_rows()]


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN where it is null."""
    col = table.column(name)
    return pc.fill_null(pc.cast(col, pa.float64()), np.nan).to_numpy() if len(col) else np.zeros(0)


def _outcomes(ledger_path: str, ids: list[str]) -> list[str]:
    """The ledger outcome of each id (its first row's: later rows with an id are its exact
    duplicates), ``derived`` for an id the ledger does not hold (a derived row)."""
    import polars as pl

    want = pl.DataFrame({"sample_id": pl.Series(ids, dtype=pl.String)}).with_row_index("_k")
    found = (pl.scan_parquet(ledger_path).select("sample_id", "outcome").with_row_index("_i")
             .join(want.lazy(), on="sample_id", how="inner").sort("_i").unique(subset=["_k"], keep="first", maintain_order=True).collect())
    out = ["derived"] * len(ids)
    for k, o in found.select("_k", "outcome").iter_rows():
        out[k] = o
    return out


def _reasons(stats: dict[str, Any]) -> str:
    reasons = stats.get("reasons") or {}
    return "; ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))


def empty_rewrites(summary: dict[str, Any]) -> list[str]:
    """One line per rewrite step that made no row: how many rows it had and why it used none."""
    out = []
    for name, r in ((summary.get("derived") or {}).get("rewrites") or {}).items():
        if not r.get("derived_rows"):
            why = _reasons(r)
            out.append(f"rewrite `{name}` made no rows from its {r.get('input_rows', 0)} input rows" + (f" ({why})" if why else ""))
    return out


def empty_selection(summary: dict[str, Any]) -> str | None:
    """When the run selected no row (input or derived): where the rows ran out, as one sentence
    starting "no rows selected:"; None when some row was selected. Read from the summary's counts,
    inputs, selection rounds and rewrite stats."""
    counts, derived = summary["counts"], summary.get("derived")
    if counts.get("selected", 0) or (derived and derived["counts"].get("selected", 0)):
        return None
    n_input = summary["n_input"]
    if not n_input:
        return "no rows selected: the inputs hold no rows"
    if not sum(s.get("n_valid", 0) for s in summary.get("inputs", [])):
        return f"no rows selected: none of the {n_input} input rows passed ingest (all quarantined; see the outcomes below)"
    rounds = derived["rounds"] if derived else [{"round": "select", "steps": summary["steps"], "selected": counts.get("selected", 0)}]
    for k, rnd in enumerate(rounds):
        if rnd["selected"]:
            continue
        steps = rnd["steps"]
        if steps and steps[0]["in"]:
            s = next((s for s in steps if not s["kept"]), steps[-1])
            return (f"no rows selected: {rnd['round']} step {s['step']} ({s['name']}) kept none of the {s['in']} rows that reached it "
                    f"(they are {s['outcome_of_dropped']})")
        if k == 0:
            return f"no rows selected: {rnd['round']} had an empty pool ({counts.get('quarantined', 0)} rows quarantined before it)"
        why = "a rewrite above made no rows" if empty_rewrites(summary) else "the rewrites left it no row"
        return f"no rows selected: {rnd['round']} had an empty pool ({why})"
    return "no rows selected"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run summary as markdown (used for the report and the Prefect artifact)."""
    counts = summary["counts"]
    warnings = [f"{s['stage']}: {w}" for s in summary["stages"] for w in s.get("warnings", [])]
    lines = [
        f"# curate run: {summary['flow']}",
        "",
        html.escape(summary.get("description") or "", quote=False),
        "",
        f"- flow file: `{summary['flow_path']}` (config hash `{summary['config_hash'][:12]}`), seed {summary['seed']}",
        f"- output: `{summary['output_dir']}`",
        f"- {summary['n_input']} input rows → **{counts['selected']} selected**, {counts['not_selected']} not selected, "
        f"{counts['filtered']} filtered, {counts['quarantined']} quarantined (reconciled: {summary['reconciled']})",
        *([f"- {summary['derived']['n_derived']} derived rows (rewrites: {', '.join(summary['derived']['rewrites'])}) → "
           f"**{summary['derived']['counts'].get('selected', 0)} selected**, "
           f"{summary['derived']['counts'].get('not_selected', 0)} not selected, "
           f"{summary['derived']['counts'].get('filtered', 0)} filtered, {summary['derived']['counts'].get('quarantined', 0)} quarantined "
           f"(reconciled: {summary['derived']['reconciled']})"] if summary.get("derived") else []),
        *[f"- {html.escape(line, quote=False)}" for line in empty_rewrites(summary)],
        *([f"- **{html.escape(note, quote=False)}**"] if (note := empty_selection(summary)) else []),
        f"- wall time {summary['seconds']:.1f} s",
        "",
        *(["## Warnings", "", *[f"- {html.escape(w, quote=False)}" for w in warnings], ""] if warnings else []),
        "## Stages",
        "",
        _table(["stage", "tasks", "rows", "computed rows", "seconds"],
               [[s["stage"], s["tasks"], s.get("rows", ""), s.get("computed_rows", ""), f"{s['seconds']:.2f}"] for s in summary["stages"]]),
        "",
        "## Inputs",
        "",
        _table(["source", "format", "files", "rows", "valid", "quarantined"],
               [[s["source"], s["format"], ", ".join(s["files"]), s["n_rows"], s["n_valid"], s["n_quarantined"]]
                for s in summary["inputs"]]),
        "",
        *([diff_markdown(summary["diff"])] if summary.get("diff") else []),
        "## Selection steps",
        "",
    ]
    if summary["steps"]:
        lines.append(_table(["#", "method", "in", "kept", "dropped as", "details"],
                            [[s["step"], s["name"], s["in"], s["kept"], s["outcome_of_dropped"],
                              ", ".join(f"{k}={v}" for k, v in s.items()
                                        if k not in ("step", "method", "name", "in", "kept", "outcome_of_dropped",
                                                     "radius_curve", "warning"))]
                             for s in summary["steps"]]))
    else:
        lines.append("No selection steps: every valid row is selected.")
    return "\n".join(lines) + "\n"


def rows_section(summary: dict[str, Any], out_dir: str, n: int) -> list[str]:
    """The rows section (:mod:`curate.report.rows`) of the run in ``out_dir``; a note instead when the
    run's files cannot be read as rows (the report is still written)."""
    import polars as pl

    from curate.report.rows import rows_markdown
    from curate.view.rows import NotARun, run_files

    try:
        return rows_markdown(run_files(out_dir, summary), n, summary.get("output_dir") or out_dir)
    except (OSError, NotARun, pl.exceptions.PolarsError) as exc:
        return ["## Rows", "", f"Rows could not be read for this section: {html.escape(str(exc), quote=False)}", ""]


def write_report(summary: dict[str, Any], scores_path: str, ledger_path: str, out_dir: str,
                 embeddings: np.ndarray | None = None, plots_on: bool = True, max_points: int = 5000, seed: int = 0,
                 sample_rows: int = 3) -> str:
    out = Path(out_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    md = [summary_markdown(summary)]
    md += ["## Outcomes", "", _table(["outcome", "stage", "reason", "rows"], reason_rows(ledger_path)), ""]
    derived_ledger = Path(ledger_path).with_name("derived_ledger.parquet")
    if summary.get("derived") and derived_ledger.exists():
        md += ["## Outcomes of derived rows", "", _table(["outcome", "stage", "reason", "rows"], reason_rows(str(derived_ledger))), "",
               _table(["rewrite", "input rows", "derived", "used", "passthrough", "dropped", "quarantined"],
                      [[name, r["input_rows"], r["derived_rows"], r["used"], r["passthrough"], r["dropped"], r["quarantined"]]
                       for name, r in summary["derived"]["rewrites"].items()]), ""]
        reasons = [[name, reason, n] for name, r in summary["derived"]["rewrites"].items()
                   for reason, n in (r.get("reasons") or {}).items()]
        if reasons:
            md += ["Rows a rewrite did not use, and what it produced but rejected, by reason:", "",
                   _table(["rewrite", "what: reason", "rows"], reasons), ""]

    names = pq.read_schema(scores_path).names  # the score table is read column by column, never as Python rows
    score_names = [c for c in names if "." in c and not c.endswith(".status")]
    map_columns = [c for c in ("sample_id", "source") if c in names] if plots_on and embeddings is not None else []
    table = pq.read_table(scores_path, columns=["selected", *score_names, *map_columns])  # once
    selected = table.column("selected").to_numpy().astype(bool) if table.num_rows else np.zeros(0, bool)
    values = {n: _floats(table, n) for n in score_names}
    if score_names:
        md += ["## Scores (candidates | selected)", "",
               _table(["score", "min", "p25", "median", "p75", "max", "selected median"],
                      [[n, *_q(values[n]), _q(values[n][selected])[2]] for n in score_names]), ""]
    if plots_on:
        md += ["## Plots", ""]
        plots.outcomes_bar(summary["counts"], out / "outcomes.png")
        md += ["![outcomes](outcomes.png)", ""]
        for n in score_names:
            if n.split(".", 1)[1] in SKIP_HIST:
                continue
            fname = f"hist-{n.replace('.', '-')}.png"
            plots.score_histogram(n, values[n], selected, out / fname)
            md += [f"![{n}]({fname})", ""]
        if embeddings is not None and len(embeddings) >= 3:
            idx = np.arange(len(embeddings))
            if len(idx) > max_points:  # keep every selected row, sample the rest (seeded)
                rng = np.random.default_rng(seed)
                rest = rng.choice(np.flatnonzero(~selected), size=max(0, max_points - int(selected.sum())), replace=False)
                idx = np.sort(np.concatenate([np.flatnonzero(selected), rest]))
            xy = plots.pca_2d(np.asarray(embeddings[idx], dtype=np.float64))  # one projection for the three maps
            plots.embedding_map(xy, selected[idx], out / "embedding-map.png", f"embedding map (PCA, {len(idx)} rows)")
            md += ["![embedding map](embedding-map.png)", ""]
            shown = table.select(map_columns).take(pa.array(idx, pa.int64()))
            plots.embedding_map_by(xy, _outcomes(ledger_path, shown.column("sample_id").to_pylist()), out / "embedding-map-outcome.png",
                                   "embedding map by outcome")
            md += ["![embedding map by outcome](embedding-map-outcome.png)", ""]
            if "source" in names:
                plots.embedding_map_by(xy, [str(s) for s in shown.column("source").to_pylist()], out / "embedding-map-source.png",
                                       "embedding map by source")
                md += ["![embedding map by source](embedding-map-source.png)", ""]
    md += rows_section(summary, out_dir, sample_rows)  # before Exports: html.py links file names only after that heading
    exp = summary.get("export")
    if exp:
        md += ["## Exports", "", _table(["file", "layout", "rows", "sha256"],
                                        [[f["path"], f["layout"], f["n_rows"], f["sha256"][:16]] for f in exp["files"]]), "",
               f"Trainer configs in `{exp['dir']}`: dataset_info.json (LLaMA-Factory), axolotl_datasets.yaml, trl_load.py.", ""]
    path = out / "report.md"
    write_text(path, "\n".join(md))
    from curate.report.html import write_html

    write_html(path, exp["dir"] if exp else None)  # report.html beside it: one self-contained file
    return str(path)
