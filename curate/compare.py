"""``curate compare``: one pool, several selections at one or more budgets → train each → evaluate each.

A compare file names a curation flow (its inputs, scorers and embedder are the pool) and the
selections to try; ``{budget}`` in a selection's steps is replaced by each budget::

    name: compare
    flow: select.yaml                     # relative to this file
    budgets: [500, 1000]
    selections:
      - name: superfiltering
        select: [{method: top_k, score: superfiltering.ifd, budget: "{budget}"}]
      - name: random
        select: [{method: random, budget: "{budget}"}]
    train: {epochs: 3}                    # curate.train.TrainSpec
    eval: {eval_set: {path: ../data/eval/alpaca_eval_40.json}}   # curate.evaluate.EvalSpec
    output_dir: ../out/compare

Each cell (selection × budget) runs the curation flow with that selection (``cells/<cell>/run``; the
store is shared, so nothing is scored twice), trains on its export (a train flow of its own) and
evaluates the result (an eval flow). ``cells/<cell>/cell.json`` records the cell's selection config,
the keys of what it ran and its numbers; a cell whose key (flow fingerprint, train and eval
settings) is already recorded is not run again, so re-running adds only new cells. The results go to
``compare.md`` (the table), ``compare.json`` and ``compare.png`` (budget on x, one line per
selection, one panel per metric, 95% bootstrap intervals as error bars), and to the Prefect UI as a
table and a markdown artifact. The table's ``judge`` column says whether the judge passed its
validity checks in that cell; where it did not, the win rates are empty, and ``compare.md``, the
markdown artifact and the plot's win-rate panels say why in words.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curate.config import StepSpec, format_validation_error, _yaml_lines
from curate.errors import ConfigError
from curate.evaluate.spec import EvalSpec
from curate.records import canonical_json, sha256_hex
from curate.train.spec import TrainSpec

log = logging.getLogger("curate.compare")


class Selection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    select: list[StepSpec] = Field(min_length=1, description="Selection steps; the string {budget} is replaced by each budget.")


class CompareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    flow: str = Field(description="The curation flow whose pool is compared (relative to this file).")
    set: list[str] = Field(default_factory=list, description="--set overrides applied to that flow in every cell.")
    budgets: list[int | float] = Field(min_length=1)
    selections: list[Selection] = Field(min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec
    output_dir: str = "out/{name}"
    prefect: bool = Field(True, description="Run as Prefect flows (false: in-process).")

    # set by load_compare
    path: str | None = Field(None, exclude=True)

    def resolve(self, p: str) -> Path:
        q = Path(p.format(name=self.name))
        return q if q.is_absolute() else (Path(self.path).parent / q).resolve()


def load_compare(path: str | Path, overrides: list[str] | None = None) -> CompareSpec:
    from curate.config import apply_override, parse_override

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such compare file")
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a compare file must be a YAML mapping (name:, flow:, selections:, …)")
    for item in overrides or []:
        parts, value = parse_override(item)
        apply_override(data, parts, value, item)
    try:
        spec = CompareSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), _yaml_lines(text))) from None
    spec.path = str(path.resolve())
    return spec


def _with_budget(node: Any, budget: int | float) -> Any:
    if isinstance(node, str) and "{budget}" in node:
        return budget if node.strip() == "{budget}" else node.replace("{budget}", str(budget))
    if isinstance(node, dict):
        return {k: _with_budget(v, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_budget(v, budget) for v in node]
    return node


def cell_name(selection: Selection, budget: int | float) -> str:
    return f"{selection.name}-{budget}"


def cell_flow(spec: CompareSpec, selection: Selection, budget: int | float):
    """The curation flow of one cell: the compared flow with this selection and its own output_dir."""
    from curate.config import load_flow

    steps = _with_budget([s.model_dump(exclude_none=True) for s in selection.select], budget)
    out = spec.resolve(spec.output_dir) / "cells" / cell_name(selection, budget) / "run"
    overrides = list(spec.set) + [f"select={json.dumps(steps)}", f"output_dir={out}", "report.plots=false",
                                  f"runtime.prefect={'true' if spec.prefect else 'false'}"]
    flow = load_flow(spec.resolve(spec.flow), overrides)
    layouts = set(flow.export.layouts) | {spec.train.layout}
    file_types = set(flow.export.file_types) | {spec.train.file_type}
    export = flow.export.model_copy(update={"layouts": sorted(layouts), "file_types": sorted(file_types)})
    # the cell's run.json records the train section, so `curate train <cell>/run` trains as the cell did
    return flow.model_copy(update={"export": export, "train": spec.train}), steps


def _content(flow, spec: CompareSpec) -> list[str]:
    """sha256 of every file the cell reads (pool inputs, eval sets of decontamination steps, the eval set):
    a changed file is a new cell even when the configuration is the same."""
    from curate.ingest.readers import expand_paths
    from curate.io import file_sha256

    files = [f for i in flow.inputs if i.path for f in expand_paths(i.path, flow.base)]
    for step in flow.select:
        es = step.params.get("eval_set")
        if isinstance(es, dict) and es.get("path"):
            files += expand_paths(es["path"], flow.base)
    if spec.eval.eval_set.path:
        files += expand_paths(spec.eval.eval_set.path, Path(spec.path).parent)
    return [file_sha256(f) for f in files]


def cell_key(flow, spec: CompareSpec) -> str:
    how = {"torch_threads"}
    return sha256_hex(canonical_json({"flow": flow.fingerprint(), "train": spec.train.model_dump(mode="json", exclude=how | {"device_map"}),
                                      "eval": spec.eval.model_dump(mode="json", exclude=how), "eval_backend": spec.eval.resolved_backend(),
                                      "files": _content(flow, spec)}))


def run_cell(spec: CompareSpec, selection: Selection, budget: int | float) -> dict[str, Any]:
    """Curate, train and evaluate one cell (or read it back when its key is recorded)."""
    from curate.io import write_json
    from curate.launch import run as run_flow

    flow, steps = cell_flow(spec, selection, budget)
    key = cell_key(flow, spec)
    cell_dir = flow.out.parent
    record_path = cell_dir / "cell.json"
    if record_path.exists():
        old = json.loads(record_path.read_text())
        if old.get("key") == key:
            log.info("compare: cell %s is recorded, not run again", cell_dir.name)
            return old
    log.info("compare: cell %s", cell_dir.name)
    run = run_flow(flow)
    trained = _train(spec, flow.out)
    evaluated = _eval(spec, trained["weights"], flow.local_store)
    record = {
        "key": key, "cell": cell_dir.name, "selection": selection.name, "budget": budget, "select": steps,
        "curation": {"config_hash": run["config_hash"], "selected": run["counts"]["selected"], "output_dir": str(flow.out)},
        "train": {"dir": str(Path(trained["weights"]).parent), "key": trained["key"], "steps": trained["steps"],
                  "first_loss": trained["first_loss"], "last_loss": trained["last_loss"], "seconds": trained["seconds"],
                  "tokens_per_s": trained["tokens_per_s"]},
        "eval": {"key": evaluated["key"], "loss": evaluated.get("loss"), "judge": evaluated.get("judge"),
                 "generation": evaluated.get("generation")},
    }
    write_json(cell_dir / "selection.json", {"selection": selection.name, "budget": budget, "select": steps, "flow": str(spec.resolve(spec.flow))})
    write_json(record_path, record)
    return record


def _train(spec: CompareSpec, run_dir: Path) -> dict[str, Any]:
    if spec.prefect:
        from curate.train.flow import train_flow

        return train_flow(spec=spec.train.model_dump(mode="json"), source=str(run_dir))
    from curate.train import train

    return train(spec.train, run_dir)


def _eval(spec: CompareSpec, model: str, store: Path) -> dict[str, Any]:
    base = str(Path(spec.path).parent)
    if spec.prefect:
        from curate.evaluate.flow import eval_flow

        return eval_flow(model=model, spec=spec.eval.model_dump(mode="json"), store_dir=str(store), base_dir=base)
    from curate.evaluate import evaluate

    return evaluate(model, spec.eval, store_dir=store, base_dir=base)


def _judge(c: dict[str, Any]) -> dict[str, Any]:
    return c["eval"].get("judge") or {}


def _ci(c: dict[str, Any], key: str) -> list[float] | None:
    if key == "eval_loss":
        return (c["eval"].get("loss") or {}).get("ci95")
    return (_judge(c).get("ci95") or {}).get(key)


#: plotted metrics: (label, key for the interval, value); the judge's rates are null where it is not valid
METRICS = (("held-out loss (nats/token)", "eval_loss", lambda c: (c["eval"].get("loss") or {}).get("loss")),
           ("win rate vs reference", "win_rate", lambda c: _judge(c).get("win_rate")),
           ("length-controlled win rate", "lc_win_rate", lambda c: _judge(c).get("lc_win_rate")),
           ("soft win rate vs reference", "soft_win_rate", lambda c: _judge(c).get("soft_win_rate")))
JUDGE_METRICS = ("win_rate", "lc_win_rate", "soft_win_rate")


def judge_status(judge: dict[str, Any]) -> str | None:
    """The judge column in words: "valid", "NOT VALID" or None (no judge)."""
    if not judge:
        return None
    return "valid" if judge.get("valid", True) else "NOT VALID"


def _span(ci: list[float] | None) -> str | None:
    return None if not ci else f"{ci[0]:.4f}–{ci[1]:.4f}"


def table(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for c in cells:
        loss = c["eval"].get("loss") or {}
        judge = _judge(c)
        gen = c["eval"].get("generation") or {}
        rows.append({"selection": c["selection"], "budget": c["budget"], "selected": c["curation"]["selected"],
                     "train_steps": c["train"]["steps"], "train_loss_first": _r(c["train"]["first_loss"]),
                     "train_loss_last": _r(c["train"]["last_loss"]), "eval_loss": _r(loss.get("loss")),
                     "eval_loss_ci95": _span(loss.get("ci95")), "eval_ppl": _r(loss.get("ppl")),
                     "judge": judge_status(judge),
                     "win_rate": _r(judge.get("win_rate")), "win_rate_ci95": _span(_ci(c, "win_rate")),
                     "lc_win_rate": _r(judge.get("lc_win_rate")), "soft_win_rate": _r(judge.get("soft_win_rate")),
                     "first_position_rate": _r(judge.get("first_position_rate")), "consistent": _r(judge.get("consistent")),
                     "avg_length": _r(gen.get("avg_length"), 1), "truncated": _r(gen.get("truncated_rate")),
                     "judged": judge.get("n_judged")})
    return rows


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def judge_note(cells: list[dict[str, Any]]) -> str | None:
    """A sentence per distinct reason the judge was not valid, with the cells it holds for; None when it was valid everywhere."""
    bad: dict[str, list[str]] = {}
    for c in cells:
        for reason in _judge(c).get("invalid_reasons") or []:
            bad.setdefault(reason, []).append(c["cell"])
    if not bad:
        return None
    n_bad = sum(1 for c in cells if _judge(c) and not _judge(c).get("valid", True))
    lines = [f"**The judge is not valid** in {n_bad} of {len(cells)} cells: their win rates are left empty (not 0.5), "
             "because its verdicts there do not measure the answers:"]
    lines += [f"- {reason} ({', '.join(names)})" for reason, names in bad.items()]
    return "\n".join(lines)


def markdown(spec: CompareSpec, rows: list[dict[str, Any]], cells: list[dict[str, Any]] | None = None) -> str:
    cols = list(rows[0]) if rows else []
    lines = [f"# compare: {spec.name}", "", spec.description, "",
             f"Pool: `{spec.flow}`; train: {spec.train.method} on `{spec.train.model}` ({spec.train.layout}); "
             f"eval: `{spec.eval.eval_set.path or spec.eval.eval_set.hub}`"
             + (f"; judge: `{spec.eval.judge.model}` ({spec.eval.judge.mode})." if spec.eval.judge else "."), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "Intervals: 95% percentile bootstrap over the eval rows "
              f"({spec.eval.bootstrap} resamples, seed {spec.eval.seed}); lengths in characters; truncated: the share of answers "
              "cut by the token limit."]
    note = judge_note(cells or [])
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    import textwrap

    from curate.report.plots import pyplot, save_png

    plt = pyplot()
    judged = any(_judge(c) for c in cells)
    metrics = [(label, key, get) for label, key, get in METRICS
               if any(get(c) is not None for c in cells) or (judged and key in JUDGE_METRICS[:1])]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.5 * max(1, len(metrics)), 3.6), dpi=100, squeeze=False)
    invalid = sorted({r for c in cells for r in (_judge(c).get("invalid_reasons") or [])})
    for ax, (label, key, get) in zip(axes[0], metrics):
        for sel in dict.fromkeys(c["selection"] for c in cells):
            pts = sorted((c["budget"], get(c), _ci(c, key)) for c in cells if c["selection"] == sel and get(c) is not None)
            if pts:
                x, y = [p[0] for p in pts], [p[1] for p in pts]
                err = [[p[1] - p[2][0] if p[2] else 0 for p in pts], [p[2][1] - p[1] if p[2] else 0 for p in pts]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=sel)
        if key in JUDGE_METRICS and invalid:
            n_bad = sum(1 for c in cells if _judge(c) and not _judge(c).get("valid", True))
            text = f"judge not valid in {n_bad} of {len(cells)} cells (no win rate):\n" + "\n".join(
                textwrap.fill(r, 48) for r in invalid[:4]) + ("\n… (compare.md)" if len(invalid) > 4 else "")
            ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", ha="left", fontsize=6.5, color="#a00000", wrap=True)
        ax.set_xlabel("budget")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    save_png(fig, path)


def compare(spec: CompareSpec) -> dict[str, Any]:
    """Run (or read back) every cell, then write the table, the plot and the artifacts."""
    from curate.io import write_json, write_text

    out = spec.resolve(spec.output_dir)
    cells = [run_cell(spec, sel, b) for sel in spec.selections for b in spec.budgets]
    rows = table(cells)
    md = markdown(spec, rows, cells)
    write_text(out / "compare.md", md)
    write_json(out / "compare.json", {"name": spec.name, "cells": cells, "table": rows})
    plot(cells, out / "compare.png")
    if spec.prefect:
        _publish(spec, md, rows)
    return {"output_dir": str(out), "table": rows, "cells": cells}


def _publish(spec: CompareSpec, md: str, rows: list[dict[str, Any]]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    create_markdown_artifact(key=f"curate-compare-{spec.name}", markdown=md, description=f"curate compare: {spec.name}")
    create_table_artifact(key=f"curate-compare-table-{spec.name}", table=rows, description="one row per selection × budget")


def run_compare(spec: CompareSpec) -> dict[str, Any]:
    """:func:`compare` as a Prefect flow run (``prefect: true``, the default) or in-process."""
    if not spec.prefect:
        return compare(spec)
    from curate.compare_flow import compare_flow

    return compare_flow(spec=spec.model_dump(mode="json"), path=spec.path, name=spec.name)
