"""``curate``: run, plan and inspect curation flows.

    curate run flows/select.yaml                   run the flow (a Prefect flow run)
    curate run flows/select.yaml --set select.1.budget=50
    curate plan flows/select.yaml                  dry run: rows, tokens, stages, cache
    curate inspect out/select                      summary of a finished run
"""

from __future__ import annotations

import json
import os
import sys

# Libraries' own tqdm bars (weight loading, GGUF de-quantisation) read this when tqdm is imported,
# which happens before any of our code runs: curate shows its own progress (see curate.progress).
os.environ.setdefault("TQDM_DISABLE", "1")
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="curate",
    help="Instruction-data curation: ingest, score, select and export the rows that train the best model.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console(stderr=False)
err = Console(stderr=True)

SET_HELP = "Override a flow value: KEY=VALUE with a dotted path, list items by index (e.g. select.1.budget=50). Repeatable."


def _load(flow: Path, overrides: list[str]):
    from curate.config import load_flow

    return load_flow(flow, overrides)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    flow: Path = typer.Argument(..., help="The flow YAML file, e.g. flows/select.yaml.", exists=False),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Run the same stages in-process, without a Prefect flow run."),
    progress: Optional[bool] = typer.Option(None, "--progress/--quiet", help="Progress bars (default: on in a terminal, off under CI)."),
) -> None:
    """Run a flow: ingest → embed/score → select → export → report.

    Scores and embeddings already in the store are reused, so a second run scores nothing and a
    killed run resumes where it stopped. Outputs go to the flow's output_dir: the exported subset in
    export/, the ledger of every input row, and report/report.md.
    """
    from curate.errors import CurateError

    try:
        overrides = list(set_)
        if no_prefect:
            overrides.append("runtime.prefect=false")
        if progress is not None:
            overrides.append(f"runtime.progress={'true' if progress else 'false'}")
        spec = _load(flow, overrides)
        from curate.launch import run as run_flow

        summary = run_flow(spec)
    except CurateError as exc:
        _fail(exc)
        return
    _print_summary(summary)


@app.command()
def plan(
    flow: Path = typer.Argument(..., help="The flow YAML file."),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="Estimate model stages' time from a short measured warm-up (loads the models)."),
) -> None:
    """Dry run: read and validate the inputs, count rows and tokens, and show each stage with how many
    rows the store already holds and, with the warm-up, how long it will take. Writes nothing."""
    from curate.errors import CurateError

    try:
        spec = _load(flow, list(set_))
        from curate.pipeline import plan as make_plan

        p = make_plan(spec, warmup=warmup)
    except CurateError as exc:
        _fail(exc)
        return
    if as_json:
        console.print_json(json.dumps(p))
        return
    console.print(f"[bold]{p['flow']}[/]: {p['n_input']} input rows, {p['n_valid']} valid, {p['n_quarantined']} quarantined, "
                  f"{p['n_duplicates']} duplicates; {p['n_shards']} shards; ~{p['tokens']:,} tokens (words and punctuation)")
    t = Table("source", "format", "files", "rows", "valid", "quarantined", title="inputs")
    for s in p["inputs"]:
        t.add_row(s["source"], s["format"], ", ".join(s["files"]), str(s["n_rows"]), str(s["n_valid"]), str(s["n_quarantined"]))
    console.print(t)
    t = Table("stage", "reads → writes", "what", "cached rows", "to compute", "work", "estimate", title="stages")
    for s in p["stages"]:
        work = f"{s['work']:,} {s['unit']} at {s['rate']:,.0f}/s" if "work" in s else s.get("note", "")
        est = f"{s['estimate_s']:.0f} s" if "estimate_s" in s else ""
        flow = f"{', '.join(s.get('reads', []))} → {', '.join(s.get('writes', []))}"
        t.add_row(s["stage"], flow, str(s.get("what", "")), str(s.get("cached_rows", "")), str(s.get("to_compute", "") or ""), work, est)
    console.print(t)
    for s in p["stages"]:
        if "max_calls" in s:
            console.print(f"{s['stage']}: {s['note']}", highlight=False, soft_wrap=True)
    if p["estimate_s"]:
        console.print(f"estimated model time: {p['estimate_s']:.0f} s (plus start-up and model loading)")
    console.print(f"output: {p['output_dir']}\nstore:  {p['store_dir']}")


@app.command()
def inspect(out_dir: Path = typer.Argument(..., help="A run's output_dir (holds run.json and ledger.parquet).")) -> None:
    """Summarise a finished run: outcome counts, reasons, selection steps and exported files."""
    run_json = out_dir / "run.json"
    if not run_json.exists():
        _fail(FileNotFoundError(f"{run_json}: not found; is {out_dir} the output_dir of a finished run?"))
    summary = json.loads(run_json.read_text())
    _print_summary(summary)
    from curate.report.report import reason_rows

    t = Table("outcome", "stage", "reason", "rows", title="why input rows ended where they did")
    for row in reason_rows(str(out_dir / "ledger.parquet"), limit=40):
        t.add_row(*map(str, row))
    console.print(t)
    derived = summary.get("derived")
    if derived and (out_dir / "derived_ledger.parquet").exists():
        t = Table("outcome", "stage", "reason", "rows", title="why derived rows ended where they did")
        for row in reason_rows(str(out_dir / "derived_ledger.parquet"), limit=40):
            t.add_row(*map(str, row))
        console.print(t)
    rounds = derived["rounds"] if derived else [{"round": "select", "steps": summary["steps"]}]
    for r in rounds:
        if r["steps"]:
            t = Table("#", "step", "in", "kept", "dropped as", title=f"selection steps ({r['round']})")
            for s in r["steps"]:
                t.add_row(str(s["step"]), s["name"], str(s["in"]), str(s["kept"]), s["outcome_of_dropped"])
            console.print(t)


def _print_summary(summary: dict) -> None:
    c = summary["counts"]
    console.print(
        f"[bold]{summary['flow']}[/]: {summary['n_input']} rows → [green]{c['selected']} selected[/], {c['not_selected']} not selected, "
        f"{c['filtered']} filtered, {c['quarantined']} quarantined · {summary['seconds']:.1f} s"
    )
    derived = summary.get("derived")
    if derived:
        d = derived["counts"]
        console.print(
            f"derived rows: {derived['n_derived']} made → [green]{d.get('selected', 0)} selected[/], {d.get('not_selected', 0)} not selected, "
            f"{d.get('filtered', 0)} filtered, {d.get('quarantined', 0)} quarantined (lineage.parquet links them to their parents)"
        )
    t = Table("stage", "tasks", "rows", "computed", "seconds", title="stages")
    for s in summary["stages"]:
        t.add_row(s["stage"], str(s["tasks"]), str(s.get("rows", "")), str(s.get("computed_rows", "")), f"{s['seconds']:.2f}")
    console.print(t)
    exp = summary.get("export")
    if exp:
        console.print(f"export: {exp['dir']}")
    if summary.get("report"):
        console.print(f"report: {summary['report']}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
