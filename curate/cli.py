"""``curate``: run, plan and inspect curation flows.

    curate run flows/select.yaml                   run the flow (a Prefect flow run)
    curate run flows/select.yaml --set select.1.budget=50
    curate plan flows/select.yaml                  dry run: rows, tokens, stages, cache
    curate inspect out/select                      summary of a finished run
    curate show out/select --outcome filtered      a run's rows: text, scores, outcome and reason
    curate train out/select                        fine-tune on the export (LoRA on the bundled SmolLM2)
    curate eval out/select/train/<key>/adapter --on data/eval/alpaca_eval_40.json
    curate compare flows/compare.yaml              selections × budgets → train → eval → one table
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
from rich.markup import escape
from rich.table import Table

class _FlagHelp:
    """Click's ``--help`` option without the ``<bool>`` type typer's rich help gives it (a flag takes no value)."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt


class HelpGroup(_FlagHelp, typer.core.TyperGroup):
    pass


class HelpCommand(_FlagHelp, typer.core.TyperCommand):
    pass


app = typer.Typer(
    name="curate",
    cls=HelpGroup,
    help="Instruction-data curation: ingest, score, select and export the rows that train the best model.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console(stderr=False)
err = Console(stderr=True)

SET_HELP = ("Override a flow value, e.g. select[1].budget=50 (or select.1.budget=50), select[-1].budget=20 (the last step), "
            "'select[+]={method: random, budget: 10}' (append a step); a value is YAML, other text stays text. Repeatable.")


def _load(flow: Path, overrides: list[str]):
    from curate.config import load_flow

    return load_flow(flow, overrides)


def _fail(exc: Exception) -> None:
    """The one message of an expected error (user text as written: ``[…]`` is never read as markup), exit code 2."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)  # paths print as written: [v2] too
    raise typer.Exit(2)


def _say(text: str) -> None:
    """Print text that holds user values (paths, names, patterns) as written."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


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
        if spec.train is not None:  # before curating for minutes: training needs the train extra
            from curate.errors import require
            from curate.train.sft import INSTALL

            require("trl", "the flow's train: section", INSTALL)
            require("peft", "the flow's train: section", INSTALL)
        from curate.launch import run as run_flow

        summary = run_flow(spec)
        _print_summary(summary)
        if spec.train is not None:
            _print_train(_run_train(spec.train, summary["output_dir"], None, spec.runtime.prefect))
    except CurateError as exc:
        _fail(exc)
        return
    except (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError) as exc:  # the folders changed under the run
        _fail(f"{exc.filename}: {exc.strerror} (check output_dir and store_dir in {flow})")
        return


@app.command()
def plan(
    flow: Path = typer.Argument(..., help="The flow YAML file."),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup",
                                help="Estimate model stages' time from a short measured warm-up (loads the models)."),
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
    _print_plan(p, console.width)


def _print_plan(p: dict, width: int) -> None:
    """The plan as indented lines wrapped at the terminal's width (readable at 80 columns): the inputs,
    then each stage with what it reads and writes, what it does, its cached rows and its estimate."""
    import textwrap

    width = max(width, 40)

    def say(text: str, indent: int = 0, hang: int = 2) -> None:
        _say(textwrap.fill(text, width=width, initial_indent=" " * indent, subsequent_indent=" " * (indent + hang),
                           break_on_hyphens=False, break_long_words=False) if len(text) + indent > width else " " * indent + text)

    say(f"{p['flow']}: {p['n_input']} input rows, {p['n_valid']} valid, {p['n_quarantined']} quarantined, {p['n_duplicates']} duplicates; "
        f"{p['n_shards']} shard{'s' if p['n_shards'] != 1 else ''}; ~{p['tokens']:,} tokens (words and punctuation)")
    _say("\ninputs")
    for s in p["inputs"]:
        say(f"{s['source']} ({s['format']}): {s['n_rows']} rows, {s['n_valid']} valid, {s['n_quarantined']} quarantined — "
            f"{', '.join(s['files'])}", 2, 4)
    _say("\nstages")
    for i, s in enumerate(p["stages"], 1):
        say(f"{i}. {s['stage']} ({', '.join(s.get('reads', []))} → {', '.join(s.get('writes', []))})", 2, 5)
        what = str(s.get("what", ""))
        parts = (what.split("; ") if s.get("kind") == "select" else [what]) if what else []
        facts = []
        if "cached_rows" in s:
            facts.append(f"{s['cached_rows']:,} rows cached, {s.get('to_compute') or 0:,} to compute")
        if "work" in s:
            facts.append(f"{s['work']:,} {s['unit']} at {s['rate']:,.0f}/s")
        if "estimate_s" in s:
            facts.append(f"~{s['estimate_s']:.0f} s")
        if parts and facts and s.get("kind") != "select":
            parts[-1] += ": " + "; ".join(facts)
        elif facts:
            parts.append("; ".join(facts))
        if s.get("note"):
            parts.append(s["note"])
        for part in parts:
            say(part, 5, 4)
    if p["estimate_s"]:
        say(f"\nestimated model time: {p['estimate_s']:.0f} s (plus start-up and model loading)")
    _say(f"\noutput: {p['output_dir']}\nstore:  {p['store_dir']}")


@app.command()
def inspect(out_dir: Path = typer.Argument(..., help="A run's output_dir (holds run.json and ledger.parquet), or its flow YAML.")) -> None:
    """Summarise a finished run: outcome counts, reasons, selection steps and exported files."""
    from curate.history import run_dir

    if out_dir.is_file():  # a flow file: followed to its output_dir (as `curate show` does)
        from curate.errors import CurateError
        from curate.view.rows import find_run

        try:
            out_dir = find_run(out_dir)
        except CurateError as exc:
            _fail(exc)
    out_dir = run_dir(out_dir)  # a versioned output folder: its latest run
    run_json = out_dir / "run.json"
    if not run_json.exists():
        _fail(FileNotFoundError(f"{run_json}: not found; is {out_dir} the output_dir of a finished run?"))
    summary = json.loads(run_json.read_text())
    _print_summary(summary)
    from curate.report.report import reason_rows

    t = Table("outcome", "stage", "reason", "rows", title="why input rows ended where they did")
    for row in reason_rows(str(out_dir / "ledger.parquet"), limit=40):
        t.add_row(*(escape(str(x)) for x in row))
    console.print(t)
    derived = summary.get("derived")
    if derived and (out_dir / "derived_ledger.parquet").exists():
        t = Table("outcome", "stage", "reason", "rows", title="why derived rows ended where they did")
        for row in reason_rows(str(out_dir / "derived_ledger.parquet"), limit=40):
            t.add_row(*(escape(str(x)) for x in row))
        console.print(t)
    rounds = derived["rounds"] if derived else [{"round": "select", "steps": summary["steps"]}]
    for r in rounds:
        if r["steps"]:
            t = Table("#", "step", "in", "kept", "dropped as", title=f"selection steps ({r['round']})")
            for s in r["steps"]:
                t.add_row(str(s["step"]), escape(s["name"]), str(s["in"]), str(s["kept"]), s["outcome_of_dropped"])
            console.print(t)


@app.command()
def show(
    out_dir: Path = typer.Argument(..., help="A run's output_dir (holds run.json), or its flow YAML."),
    outcome: Optional[str] = typer.Option(None, "--outcome",
                                          help="Only rows with this outcome: selected, not_selected, filtered or quarantined."),
    reason: Optional[str] = typer.Option(None, "--reason",
                                         help="Only rows with this reason, e.g. below_min, beyond_budget, exact_duplicate."),
    source: Optional[str] = typer.Option(None, "--source", help="Only rows of this input (its name), or rewrite:<step> for derived rows."),
    sort: Optional[str] = typer.Option(None, "--sort", help="Sort by this score (heuristic.response_tokens, or response_tokens when one "
                                       "scorer has it), or by rank; default: row order."),
    desc: bool = typer.Option(False, "--desc", help="Sort descending (highest first)."),
    limit: int = typer.Option(10, "--limit", "-n", min=0, help="Show at most this many rows."),
    full: bool = typer.Option(False, "--full", help="Whole texts and every message (default: previews cut with …)."),
) -> None:
    """Show a finished run's rows: text, scores, outcome, reason and detail, wrapped at the terminal's width.

    Filters combine (--outcome not_selected --reason beyond_budget); a derived row shows its parents beside it
    (under it below 120 columns). Reads the run's Parquet lazily: a large run is filtered and sorted without loading its text.
    """
    from curate.errors import CurateError
    from curate.view.show import show as show_rows

    try:
        show_rows(out_dir, Console(highlight=False), outcome, reason, source, sort, desc, limit, full)
    except CurateError as exc:
        _fail(exc)


def _run_train(spec, source: str, out: Optional[Path], prefect: bool) -> dict:
    from curate.train.distributed import is_main

    if prefect and is_main():  # several processes (torchrun): one flow run, rank 0's; the others train beside it
        from curate.train.flow import train_flow

        return train_flow(spec=spec.model_dump(mode="json"), source=str(source), out_dir=str(out) if out else None)
    from curate.train import train as train_export

    return train_export(spec, source, out)


def _print_train(rec: dict) -> None:
    b = rec["batch"]
    loss = "" if rec.get("first_loss") is None else f", loss {rec['first_loss']:.4f} → {rec['last_loss']:.4f}"
    console.print(f"[bold]train[/]: {escape(str(rec['base_model']['name']))} ({rec['method']}) on {rec['export']['n_rows']} rows of "
                  f"{escape(str(rec['export']['file']))}: {rec['steps']} steps ({b['rows_per_step']} rows each)"
                  f"{loss}, {rec['seconds']:.0f} s"
                  + (f", {rec['tokens_per_s']:.0f} tokens/s" if rec.get("tokens_per_s") else ""),
                  highlight=False, soft_wrap=True)
    _say(f"weights: {rec['weights']}\nrecord:  {Path(rec['weights']).parent / 'train.json'}")


def _train_spec(source: Path, flow: Optional[Path], overrides: list[str]):
    """The train section of ``flow`` (else of the flow that made ``source``, from its run.json; else
    the defaults), with ``--set`` overrides applied."""
    import yaml

    from curate.config import apply_override, parse_override
    from curate.errors import ConfigError
    from curate.train.spec import TrainSpec

    from curate.history import run_dir

    data: dict = {}
    run_json = run_dir(source) / "run.json"
    recorded = json.loads(run_json.read_text()).get("train") if run_json.exists() else None
    if flow is None and recorded:  # the train: section the run was started with (its --set overrides included)
        data = dict(recorded)
    elif flow is not None:
        loaded = yaml.safe_load(flow.read_text(encoding="utf-8")) or {}
        data = dict(loaded.get("train") or {}) if "inputs" in loaded else dict(loaded)
    for item in overrides:
        parts, value = parse_override(item)
        parts = parts[1:] if parts[0] == "train" else parts
        if not parts:
            raise ConfigError(f"--set {item}: give a train key, e.g. --set epochs=1")
        apply_override(data, parts, value, item)
    from pydantic import ValidationError

    from curate.config import format_validation_error

    try:
        return TrainSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(flow or "train"), {}, ("train",))) from None


@app.command()
def train(
    source: Path = typer.Argument(..., help="A run's output_dir (out/select) or its export folder."),
    flow: Optional[Path] = typer.Option(None, "--flow", "-f", help="Take the train: section of this flow (or a YAML of train keys). "
                                        "Default: the flow that made SOURCE, else the defaults."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a train key: --set epochs=1 --set lora.r=8 --set method=full."),
    out: Optional[Path] = typer.Option(None, "--out", help="Train directory (default: SOURCE/train/<key>)."),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Train in-process, without a Prefect flow run."),
) -> None:
    """Fine-tune a model on an export: TRL SFTTrainer with PEFT LoRA (default) or full fine-tuning.

    Reads the export's prompt_completion (or messages) file unchanged; loss on assistant tokens only.
    Writes train.json (config, export sha256, trainer versions, loss curve), loss.png and the adapter
    (or model). A run with the same config and data is not trained again. Needs: pip install 'curate[train]'.

    Several processes (GPUs, or CPUs over gloo): torchrun --nproc_per_node N -m curate train SOURCE …
    """
    from curate.errors import CurateError

    try:
        spec = _train_spec(source, flow, list(set_))
        rec = _run_train(spec, str(source), out, not no_prefect)
    except CurateError as exc:
        _fail(exc)
        return
    from curate.train.distributed import is_main

    if is_main():  # several processes: one summary
        _print_train(rec)


@app.command(name="eval")
def eval_(
    model: str = typer.Argument(..., help="A model: a curate train adapter or model dir, a bundled name, a local dir or a hub id."),
    on: Path = typer.Option(..., "--on", help="The eval set (JSON/JSONL/Parquet/CSV in any supported layout), "
                                              "e.g. data/eval/alpaca_eval_40.json."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N eval rows."),
    judge: Optional[str] = typer.Option(None, "--judge", help="The judge model (default: the bundled SmolLM2)."),
    no_judge: bool = typer.Option(False, "--no-judge", help="Held-out loss only: no generation, no judging."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Judge against this model's answers instead of the set's own."),
    prompt_field: Optional[str] = typer.Option(None, "--prompt-field", help="A prompts-only set (e.g. Koala: prompt, Vicuna: turns): "
                                               "the field with each request; needs --reference."),
    set_: list[str] = typer.Option([], "--set", "-s",
                                   help="Override an eval key: --set generate.max_tokens=128 --set judge.backend=openai."),
    out: Optional[Path] = typer.Option(None, "--out", help="Eval directory (default: beside a trained model, else out/eval/<key>)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Cache generations and judge replies here (default: the eval directory)."),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Evaluate in-process, without a Prefect flow run."),
) -> None:
    """Evaluate a model on an eval set: held-out loss and perplexity (batched masked-CE scoring),
    greedy answers to the eval prompts, and a pairwise judge against the set's reference answers
    in both orders; a judge that fails its validity checks (position bias, consistency after the swap,
    verdict-token mass) is reported not valid, with no win rate."""
    from pydantic import ValidationError

    from curate.config import apply_override, format_validation_error, parse_override
    from curate.errors import ConfigError, CurateError
    from curate.evaluate.spec import EvalSpec

    data: dict = {"eval_set": {"path": str(on), **({"limit": limit} if limit else {})}}
    if reference:
        data["reference"] = reference
    if prompt_field:
        data["prompt_field"] = prompt_field
    if no_judge:
        data["judge"] = None
    elif judge:
        data["judge"] = {"model": judge}
    try:
        for item in set_:
            parts, value = parse_override(item)
            apply_override(data, parts, value, item)
        try:
            spec = EvalSpec.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "curate eval", {})) from None
        if no_prefect:
            from curate.evaluate import evaluate

            rec = evaluate(model, spec, out, store)
        else:
            from curate.evaluate.flow import eval_flow

            rec = eval_flow(model=model, spec=spec.model_dump(mode="json"), out_dir=str(out) if out else None,
                            store_dir=str(store) if store else None)
    except (CurateError, ValueError) as exc:
        _fail(exc)
        return
    t = Table("metric", "value", title=f"eval: {escape(model)}")
    loss, gen, jd = rec.get("loss") or {}, rec.get("generation") or {}, rec.get("judge") or {}
    fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    ci = lambda c: "" if not c else f" (95% CI {c[0]:.3f}–{c[1]:.3f})"  # noqa: E731
    if loss:
        se = f" ± {loss['se']:.4f}" if loss.get("se") else ""
        t.add_row("held-out loss (nats/token)", f"{loss['loss']:.4f}{se}" + ci(loss.get("ci95")))
        t.add_row("perplexity", f"{loss['ppl']:.3f}" + ci(loss.get("ppl_ci95")))
        t.add_row("scored tokens / rows", f"{loss['n_tokens']} / {loss['n_rows']}")
    if gen:
        t.add_row("answers generated", f"{gen['n_ok']} ({gen.get('n_truncated', 0)} cut by max_tokens, {gen['n_failed']} failed), "
                                           f"mean {gen['mean_tokens']:.0f} tokens")
        if gen.get("avg_length") is not None:
            ref_len = gen.get("reference_avg_length")
            ref = "–" if ref_len is None else f"{ref_len:.0f}"
            t.add_row("answer length (characters)", f"{gen['avg_length']:.0f} (reference {ref}); "
                                                    f"{gen['truncated_rate']:.0%} cut by the token limit")
    if jd:
        se, cis = jd.get("se") or {}, jd.get("ci95") or {}
        rate = lambda k: fmt(jd.get(k)) + (f" ± {se[k]:.3f}" if se.get(k) else "") + ci(cis.get(k))  # noqa: E731
        if jd.get("valid", True):
            t.add_row("judge", "valid (position bias, swap consistency and verdict mass within the thresholds)")
            counts = f"{jd['wins']} won, {jd['ties']} tied, {jd['losses']} lost of {jd['n_judged']}"
            t.add_row("win rate vs reference", f"{rate('win_rate')} ({counts})")
            t.add_row("length-controlled win rate", rate("lc_win_rate"))
            t.add_row("soft win rate", rate("soft_win_rate"))
        else:
            t.add_row("judge", "NOT VALID, no win rate: " + "; ".join(jd["invalid_reasons"]))
        t.add_row("verdicts agreeing after the swap", rate("consistent"))
        t.add_row("decisive verdicts for the first answer", rate("first_position_rate"))
        if jd.get("verdict_mass") is not None:
            t.add_row("verdict-token probability mass", fmt(jd["verdict_mass"]))
    console.print(t)


@app.command()
def compare(
    compare_file: Path = typer.Argument(..., help="The compare YAML, e.g. flows/compare.yaml."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a compare key: --set budgets=[20,40] --set train.max_steps=5."),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Run in-process, without Prefect flow runs."),
) -> None:
    """One pool, several selections × budgets → train each → evaluate each → one table and plot.

    Cells already recorded (same selection, budget, training and eval settings) are not run again."""
    from curate.errors import CurateError

    try:
        from curate.compare import load_compare
        from curate.compare_flow import run_compare

        spec = load_compare(compare_file, list(set_) + (["prefect=false"] if no_prefect else []))
        res = run_compare(spec)
    except CurateError as exc:
        _fail(exc)
        return
    cols = ("selection", "budget", "seeds", "selected", "train_steps", "train_tokens", "eval_loss", "eval_loss_ci95", "loss_vs_random",
            "judge", "win_rate", "win_rate_ci95")
    t = Table(*cols, title=f"compare: {escape(spec.name)} (every column: compare.md)")
    for r in res["table"]:
        t.add_row(*["–" if r.get(c) is None else escape(str(r[c])) for c in cols])
    console.print(t)
    from curate.compare import judge_note

    note = judge_note(res["cells"])
    if note:
        console.print(note.replace("**", ""), highlight=False, markup=False)
    out = Path(res["output_dir"])
    _say(f"table: {out / 'compare.md'}\nplot:  {out / 'compare.png'}")


@app.command()
def ui(
    port: int = typer.Option(4200, "--port", help="Port on 127.0.0.1."),
    stop: bool = typer.Option(False, "--stop", help="Stop the server and point curate back at temporary per-run servers."),
) -> None:
    """Start the Prefect UI on 127.0.0.1 (in the background) and make later curate commands report to it."""
    from curate.errors import CurateError
    from curate.schedule import api_url, start_ui, stop_ui

    try:
        if stop:
            stop_ui()
            console.print("Prefect server stopped; PREFECT_API_URL removed from the profile.")
            return
        url = start_ui(port)
    except CurateError as exc:
        _fail(exc)
        return
    console.print(f"Prefect UI: {url}\nAPI: {api_url(port)} (set in the active Prefect profile: later curate runs appear there)",
                  highlight=False)


SCHEDULE_HELP = "Cron expression, e.g. \"0 3 * * *\" (03:00 every day)."


@app.command()
def serve(
    flows: list[Path] = typer.Argument(..., help="Flow YAML files; one deployment each, named after the flow."),
    cron: Optional[str] = typer.Option(None, "--cron", help=SCHEDULE_HELP),
    interval: Optional[float] = typer.Option(None, "--interval", help="Seconds between runs (instead of --cron)."),
    timezone: Optional[str] = typer.Option(None, "--timezone", help="IANA time zone of the schedule (default UTC), e.g. Europe/Berlin."),
    set_: list[str] = typer.Option([], "--set", "-s",
                                   help=SET_HELP + " Stored as the deployment's overrides parameter (editable in the UI)."),
    versioned: bool = typer.Option(True, "--versioned/--in-place",
                                   help="A new output folder per run (runs/<number>-<UTC time>/) with a `latest` "
                                   "link moved atomically (default), or every run in output_dir itself."),
) -> None:
    """Serve the flows on a schedule (needs a running server: `curate ui`). Runs started from the UI
    (Quick run, Custom run) do what `curate run` does; stopping serve leaves the schedules active."""
    from curate.errors import CurateError

    try:
        from curate.schedule import serve as serve_flows

        serve_flows([str(f) for f in flows], list(set_), cron, interval, timezone, versioned=versioned)
    except CurateError as exc:
        _fail(exc)


@app.command()
def deploy(
    flows: list[Path] = typer.Argument(..., help="Flow YAML files; one deployment each."),
    pool: str = typer.Option("curate", "--pool", help="The work pool the deployments run on."),
    cron: Optional[str] = typer.Option(None, "--cron", help=SCHEDULE_HELP),
    interval: Optional[float] = typer.Option(None, "--interval", help="Seconds between runs (instead of --cron)."),
    timezone: Optional[str] = typer.Option(None, "--timezone", help="IANA time zone (default UTC)."),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    out: Path = typer.Option(Path("prefect.yaml"), "--out", help="Where to write it."),
) -> None:
    """Write a prefect.yaml for workers on other hosts (then `prefect deploy --all` and `prefect worker start --pool POOL`)."""
    from curate.errors import CurateError

    try:
        from curate.schedule import prefect_yaml

        text = prefect_yaml([str(f) for f in flows], pool, list(set_), cron, interval, timezone, project_dir=out.resolve().parent)
    except CurateError as exc:
        _fail(exc)
        return
    out.write_text(text, encoding="utf-8")
    _say(f"wrote {out}: register with `prefect deploy --all --prefect-file {out}`, run `prefect worker start --pool {pool}`")


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
            f"derived rows: {derived['n_derived']} made → [green]{d.get('selected', 0)} selected[/], "
            f"{d.get('not_selected', 0)} not selected, "
            f"{d.get('filtered', 0)} filtered, {d.get('quarantined', 0)} quarantined (lineage.parquet links them to their parents)"
        )
    t = Table("stage", "tasks", "rows", "computed", "seconds", title="stages")
    for s in summary["stages"]:
        t.add_row(s["stage"], str(s["tasks"]), str(s.get("rows", "")), str(s.get("computed_rows", "")), f"{s['seconds']:.2f}")
    console.print(t)
    exp = summary.get("export")
    if exp:
        _say(f"export: {exp['dir']}")
    if summary.get("report"):
        _say(f"report: {summary['report']}")


def _plain_help(typer_app: typer.Typer) -> None:
    """Help as the source says it: each paragraph of a command's docstring is one line for the terminal
    to wrap (the rich help keeps the docstring's own line breaks, cutting sentences in two), ``[…]`` in
    help text prints as written (``pip install 'curate[train]'``), and flags (``--help`` too) show no ``<bool>``."""
    import inspect as _inspect

    from typer.models import ParameterInfo

    for info in typer_app.registered_commands:
        if info.cls in (None, typer.core.TyperCommand):
            info.cls = HelpCommand
        cb = info.callback
        if cb.__doc__:
            paragraphs = _inspect.cleandoc(cb.__doc__).split("\n\n")
            cb.__doc__ = "\n\n".join(escape(" ".join(line.strip() for line in par.splitlines())) for par in paragraphs)
        for param in _inspect.signature(cb).parameters.values():
            opt = param.default
            if not isinstance(opt, ParameterInfo):
                continue
            if opt.help:
                opt.help = escape(opt.help)
            if param.annotation in (bool, "bool", Optional[bool], "Optional[bool]") and opt.metavar is None:
                opt.metavar = ""


@app.command()
def browse(
    out_dir: Path = typer.Argument(..., help="A run's output_dir (holds run.json), or its flow YAML."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Port on 127.0.0.1; 0 (the default): a free one."),
    open_: bool = typer.Option(False, "--open", help="Also open the page in the default web browser."),
) -> None:
    """Browse a finished run's rows in a local web page on 127.0.0.1, until Ctrl-C.

    Filter by outcome, reason, source and score range, search prompts and responses, sort by any score or row,
    50 rows a page, derived rows with their parents. Reads the run's Parquet lazily: a million-row run pages
    without being loaded.
    """
    from curate.errors import CurateError
    from curate.view.browse import browse as browse_rows

    try:
        browse_rows(out_dir, port, open_, say=_say)
    except CurateError as exc:
        _fail(exc)


_plain_help(app)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
