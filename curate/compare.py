"""``curate compare``: one pool, several selections at one or more budgets → train each → evaluate each.

A compare file names a curation flow (its inputs, scorers and embedder are the pool) and the
selections to try; ``{budget}`` in a selection's steps is replaced by each budget::

    name: compare
    flow: select.yaml                     # relative to this file
    budget_unit: tokens                   # or rows (the default)
    budgets: [20000]
    seeds: [0, 1, 2]                      # each cell trains and evaluates once per seed
    selections:
      - name: superfiltering
        select:
          - {method: top_k, score: superfiltering.ifd, budget: 0.5, rate_base: pool}   # ranks
          - {method: token_budget, tokens: "{budget}"}                                  # the budget
    baselines: {random: true, base_model: true}   # the defaults
    train: {epochs: 3}                    # curate.train.TrainSpec
    eval: {eval_set: {path: ../data/eval/alpaca_eval_40.json}}   # curate.evaluate.EvalSpec
    output_dir: ../out/compare

**Budgets.** ``budget_unit: rows``: ``{budget}`` is a row budget (a count or a fraction, as selection
steps take it). ``budget_unit: tokens``: ``{budget}`` is a budget in training tokens, and every
selection must hand it to a ``token_budget`` step (``tokens: "{budget}"``), which keeps rows in the
previous step's rank order up to that many tokens. Compare counts them as the trainer will: it adds a
``chat_tokens`` scorer for ``train.model`` to the pool flow (each row rendered by the model's chat
template, cut at the run's max_length) and makes it the ``count`` of every ``token_budget`` step that
names none. With ``fill: true`` on that step (the random baseline has it) a selection's tokens come
within the shortest remaining row of the budget; without it, within the row that stopped the prefix.

**Equal compute per budget.** Every cell at one budget — every selection, every seed — trains the
same number of optimizer steps (``train.max_steps`` is set for the cell). Tokens: each pass over a
selection's rows takes spe = max(1, budget / batch_tokens rounded half up) steps (``train.steps_per_epoch``:
rows per step = ceil(rows / spe), the last step of a pass takes the rest), steps = epochs × spe, so
with whole ``epochs`` every cell trains each of its rows exactly ``epochs`` times and the cells' tokens
differ only as their selections' tokens do. (When a selection has too few rows for spe equal steps,
e.g. 9 rows in 4 steps, its passes take fewer steps and the fixed step count runs into a further pass:
compare logs it; with several processes a step rounds up to whole rows a process, and the trainer
logs when a pass then takes fewer steps.) Rows: every selection of the budget is curated first, its export's tokens counted
with the training tokenizer (:func:`curate.train.sft.export_token_count`), steps = the least over the
selections of max(1, ceil(epochs × export tokens / batch_tokens)), rows per step ``batch_tokens`` /
the data's mean tokenized length. A ``train.max_steps`` in the compare file caps that number (the same
cap for every cell). The table gives ``selected_tokens`` (the export's tokens under the training
tokenizer), ``train_steps`` and ``train_tokens``: the tokens the trainer saw (``tokens_trained`` in the
train record) or, for a record without it, the export's tokens × the epochs trained, marked
``estimate`` in ``train_tokens_from``.

**Seeds.** Each cell trains and evaluates once per seed (``train.seed`` and ``eval.seed`` set to it).
The table has one row per selection × budget: each metric's mean over the seeds, and a 95% interval
from a percentile bootstrap that resamples the eval rows and the seeds with replacement
(:func:`curate.evaluate.stats.seed_row_bootstrap`, ``eval.bootstrap`` resamples drawn with the compare
file's ``eval.seed``), from the per-row losses and judgments each eval writes. The per-seed rows are
in ``compare.json`` (``per_seed``). The length-controlled and soft win rates are means over the
seeds without an interval (the win rate has one).

**Differences.** At each budget every selection is compared with the random baseline and with the
base model on the same eval rows and seeds: the mean over seeds of the difference in held-out loss
(and in win rate where the judge is valid in both), with a 95% paired bootstrap interval
(:func:`curate.evaluate.stats.paired_difference`). It is called "better" or "worse" only when that
interval excludes 0; otherwise "no difference shown". The random baseline is one draw, curated once
and trained with every seed: the intervals hold the seeds' and the eval rows' variation, not that of
another random draw.

**Baselines.** Unless ``baselines.random: false``, a selection ``random`` is added (a selection the
file already names ``random`` is used as it is): ``baselines.random_before`` (e.g. the selections'
``decontaminate`` step), then a seeded random draw of ``{budget}`` rows (rows) or a random order cut
by ``token_budget`` (tokens). Unless ``baselines.base_model: false``, the untrained ``train.model`` is
evaluated once per seed with the same eval settings and is the row ``base model`` (no budget, 0 steps).

**Where things go.** Each selection × budget curates once (``cells/<selection>-<budget>/run``; the store
is shared, so nothing is scored twice; ``curation.json`` records its key and export tokens); each
seed trains on that export (a train flow) and evaluates (an eval flow), recorded in
``cells/<selection>-<budget>-s<seed>/cell.json``; the base model in ``cells/base-model-s<seed>``. A
cell whose key (flow fingerprint, files, train settings with its seed and steps, eval settings) is
already recorded is not run again, so re-running adds only new cells — except with ``budget_unit:
rows``, where a new selection with fewer tokens lowers the budget's steps and so re-runs its cells;
how a cell runs (threads, devices, logging, checkpoints, ``report_to``, FSDP) is not in the key. The results go to
``compare.md`` (the table and the differences), ``compare.json`` and ``compare.png`` (budget on x,
one line per selection, the base model as a band, one panel per metric, 95% intervals as error
bars), and to the Prefect UI as a table and a markdown artifact. The ``judge`` column says whether
the judge passed its validity checks in every seed of the row; where it did not, the win rates are
empty, and ``compare.md``, the markdown artifact and the plot's win-rate panels say why in words.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from curate.config import StepSpec, format_validation_error, yaml_lines
from curate.errors import ConfigError
from curate.evaluate.spec import EvalSpec
from curate.records import canonical_json, drop_defaults, sha256_hex
from curate.train.spec import TrainSpec

log = logging.getLogger("curate.compare")

BASE = "base model"  # the base model's row in the table
BASE_DIR = "base-model"  # … and its cells' folder name
RANDOM = "random"


class Selection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    select: list[StepSpec] = Field(min_length=1, description="Selection steps; the string {budget} is replaced by each budget.")


class Baselines(BaseModel):
    model_config = ConfigDict(extra="forbid")

    random: bool = Field(True, description="Add a selection 'random' (unless the file has one): a seeded random draw at each budget.")
    random_before: list[StepSpec] = Field(default_factory=list, description="Steps the added random selection runs before its draw "
                                          "(e.g. the selections' decontaminate step), so it draws from the same cleaned pool.")
    base_model: bool = Field(True, description="Evaluate the untrained train.model once per seed: the row 'base model'.")


def _uses_budget(node: Any) -> bool:
    return isinstance(node, str) and "{budget}" in node


class CompareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    flow: str = Field(description="The curation flow whose pool is compared (relative to this file).")
    set: list[str] = Field(default_factory=list, description="--set overrides applied to that flow in every cell.")
    budget_unit: Literal["rows", "tokens"] = Field("rows", description="rows: {budget} is a row budget; tokens: a token budget, "
                                                   "handed to each selection's token_budget step.")
    budgets: list[int | float] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="Each cell trains and evaluates once per seed.")
    selections: list[Selection] = Field(min_length=1)
    baselines: Baselines = Field(default_factory=Baselines)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec
    output_dir: str = "out/{name}"
    prefect: bool = Field(True, description="Run as Prefect flows (false: in-process).")

    # set by load_compare
    path: str | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed once (got {self.seeds})")
        names = [s.name for s in self.selections]
        if len(set(names)) != len(names):
            raise ValueError(f"selections: each name once (got {', '.join(names)})")
        if self.baselines.base_model and BASE_DIR in names:
            raise ValueError(f"selections: '{BASE_DIR}' is the base model's cells; "
                             "name the selection otherwise or set baselines.base_model: false")
        if self.budget_unit == "tokens":
            bad = [b for b in self.budgets if isinstance(b, bool) or not isinstance(b, int) or b <= 0]
            if bad:
                raise ValueError(f"budgets: with budget_unit tokens every budget is a whole number of tokens > 0 (got {bad})")
            for sel in self.selections:
                if not any(st.method == "token_budget" and _uses_budget(st.params.get("tokens")) for st in sel.select):
                    raise ValueError(f"selections '{sel.name}': with budget_unit tokens each selection needs a token_budget step "
                                     "whose tokens is \"{budget}\" (e.g. - {method: token_budget, tokens: \"{budget}\"} as its last "
                                     "step; a step before it may rank with a fractional budget)")
        return self

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
        raise ConfigError(format_validation_error(exc, str(path), yaml_lines(text))) from None
    spec.path = str(path.resolve())
    return spec


def selections(spec: CompareSpec) -> list[Selection]:
    """The compared selections: the file's, and the random baseline unless it is turned off or the file has one."""
    out = list(spec.selections)
    if spec.baselines.random and all(s.name != RANDOM for s in out):
        before = [s.model_dump(exclude_none=True) for s in spec.baselines.random_before]
        if spec.budget_unit == "tokens":  # a random order has no best rows to keep first: fill the budget
            steps = [*before, {"method": "random", "budget": 1.0, "rate_base": "pool"},
                     {"method": "token_budget", "tokens": "{budget}", "fill": True}]
        else:
            steps = [*before, {"method": "random", "budget": "{budget}"}]
        out.append(Selection(name=RANDOM, select=steps))
    return out


def _with_budget(node: Any, budget: int | float) -> Any:
    if isinstance(node, str) and "{budget}" in node:
        return budget if node.strip() == "{budget}" else node.replace("{budget}", str(budget))
    if isinstance(node, dict):
        return {k: _with_budget(v, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_budget(v, budget) for v in node]
    return node


def cell_name(selection: Selection, budget: int | float, seed: int | None = None) -> str:
    """``<selection>-<budget>`` (the curation, shared by the seeds), ``…-s<seed>`` (one seed's train and eval)."""
    return f"{selection.name}-{budget}" + ("" if seed is None else f"-s{seed}")


def cell_flow(spec: CompareSpec, selection: Selection, budget: int | float):
    """The curation flow of one selection × budget: the compared flow with this selection and its own output_dir."""
    from curate.config import load_flow

    steps = _with_budget([s.model_dump(exclude_none=True) for s in selection.select], budget)
    if spec.budget_unit == "tokens":  # count what the trainer will see (see the module docstring)
        steps = [{**st, "count": [f"{TOKENS_SCORER}.tokens"]} if st["method"] == "token_budget" and "count" not in st else st
                 for st in steps]
    out = spec.resolve(spec.output_dir) / "cells" / cell_name(selection, budget) / "run"
    overrides = list(spec.set) + [f"select={json.dumps(steps)}", f"output_dir={out}", "report.plots=false",
                                  f"runtime.prefect={'true' if spec.prefect else 'false'}"]
    flow = load_flow(spec.resolve(spec.flow), overrides)
    if spec.budget_unit == "tokens" and all(s.label != TOKENS_SCORER for s in flow.score):
        flow = flow.model_copy(update={"score": [*flow.score, tokens_scorer(spec, flow)]})
    scorers = {s.label for s in flow.score}
    for i, st in enumerate(flow.select):
        if st.method == "token_budget":
            count = st.params.get("count") or ["heuristic.prompt_tokens", "heuristic.response_tokens"]
            missing = sorted({c.split(".", 1)[0] for c in count} - scorers)
            if missing:
                raise ConfigError(f"{spec.path}: selection '{selection.name}' step {i} (token_budget) counts tokens with "
                                  f"{' + '.join(count)}, but the flow {spec.flow} has no scorer {', '.join(missing)} "
                                  f"(scorers: {', '.join(sorted(scorers)) or 'none'}): add '- method: heuristic' to its score: "
                                  "section (or --set it in the compare file's set:)")
    layouts = set(flow.export.layouts) | {spec.train.layout}
    file_types = set(flow.export.file_types) | {spec.train.file_type}
    export = flow.export.model_copy(update={"layouts": sorted(layouts), "file_types": sorted(file_types)})
    # the cell's run.json records the train section, so `curate train <cell>/run` trains on it as the compare file says
    return flow.model_copy(update={"export": export, "train": spec.train}), steps


#: the scorer compare adds with budget_unit tokens (its label in the pool flow)
TOKENS_SCORER = "chat_tokens"


def tokens_scorer(spec: CompareSpec, flow) -> StepSpec:
    """A ``chat_tokens`` scorer counting rows as a run of ``spec.train`` on ``flow``'s export sees them:
    ``train.model``'s chat template, cut at the run's max_length (``train.max_length``, else the export's)."""
    t = spec.train
    params = {"model": t.model, "max_length": t.max_length or flow.export.max_length}
    if t.revision:
        params["revision"] = t.revision
    return StepSpec(method=TOKENS_SCORER, **params)


def _content(flow, spec: CompareSpec) -> list[str]:
    """sha256 of every file the cell reads (pool inputs, eval sets of decontamination steps, the eval set):
    a changed file is a new cell even when the configuration is the same."""
    from curate.ingest.readers import expand_paths
    from curate.io import file_sha256

    files = [f for i in flow.inputs if i.path for f in expand_paths(i.path, flow.base)] if flow is not None else []
    for step in flow.select if flow is not None else []:
        es = step.params.get("eval_set")
        if isinstance(es, dict) and es.get("path"):
            files += expand_paths(es["path"], flow.base)
    if spec.eval.eval_set.path:
        files += expand_paths(spec.eval.eval_set.path, Path(spec.path).parent)
    return [file_sha256(f) for f in files]


#: how a cell runs, not what it computes (as TrainSpec.key leaves them out): changing them re-runs no cell
HOW = {"torch_threads"}
TRAIN_HOW = HOW | {"device", "device_map", "logging_steps", "save_steps", "gradient_checkpointing", "report_to", "fsdp", "fsdp_config"}


#: settings added after cells were first recorded, with their defaults: left out of a cell's key while at the
#: default, so a cell recorded before they existed keeps its key (TrainSpec.steps_per_epoch; the eval set's
#: InputSpec.delimiter / keep_columns / license)
LATER_DEFAULTS = {"steps_per_epoch": None, "delimiter": None, "keep_columns": "none", "license": None}


def key_dump(model: BaseModel, exclude: set[str]) -> dict[str, Any]:
    """``model.model_dump(mode="json", exclude=exclude)`` without the :data:`LATER_DEFAULTS` still at their
    default, at any depth: what a cell key hashes."""
    def drop(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: drop(v) for k, v in drop_defaults(node, LATER_DEFAULTS).items()}
        if isinstance(node, list):
            return [drop(v) for v in node]
        return node

    return drop(model.model_dump(mode="json", exclude=exclude))


def cell_key(flow, spec: CompareSpec, train: TrainSpec | None = None, evaluation: EvalSpec | None = None) -> str:
    """What a cell computes: the curation flow, the files it reads, the train and eval settings (a seed's own)."""
    train, evaluation = train or spec.train, evaluation or spec.eval
    return sha256_hex(canonical_json({"flow": flow.fingerprint(), "train": key_dump(train, TRAIN_HOW),
                                      "eval": key_dump(evaluation, HOW), "eval_backend": evaluation.resolved_backend(),
                                      "files": _content(flow, spec)}))


def curation_key(flow, spec: CompareSpec) -> str:
    """What a selection × budget's curation and its token count depend on."""
    t = spec.train
    return sha256_hex(canonical_json({"flow": flow.fingerprint(), "files": _content(flow, spec),
                                      "tokens": [t.model, t.revision, t.layout, t.file_type, t.chat_template, t.max_length]}))


def curate_cell(spec: CompareSpec, selection: Selection, budget: int | float) -> dict[str, Any]:
    """Curate one selection × budget (or read it back when its key is recorded) and count its export's tokens."""
    from curate.io import write_json
    from curate.launch import run as run_flow
    from curate.train.sft import export_token_count

    flow, steps = cell_flow(spec, selection, budget)
    key = curation_key(flow, spec)
    path = flow.out.parent / "curation.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key") == key and Path(old.get("output_dir", "")).exists():
            return {**old, "flow": flow}
    log.info("compare: curating %s", flow.out.parent.name)
    run = run_flow(flow)
    rec = {"key": key, "selection": selection.name, "budget": budget, "select": steps, "config_hash": run["config_hash"],
           "selected": run["counts"]["selected"], "output_dir": str(flow.out),
           "export_tokens": export_token_count(spec.train, flow.out) if run["counts"]["selected"] else 0,
           "steps": [{k: v for k, v in st.items() if k in ("method", "in", "kept", "tokens", "tokens_kept", "budget")}
                     for st in run.get("steps", [])]}
    budgeted = [st for st in rec["steps"] if st.get("method") == "token_budget"]
    if spec.budget_unit == "tokens" and budgeted and rec["selected"] and budgeted[-1].get("tokens_kept") != rec["export_tokens"]:
        log.warning("compare: %s: its token_budget step kept %s tokens, the training tokenizer counts %s in its export (the "
                    "step counts otherwise, or train.chat_template renders other text than the model's own): its cells train "
                    "on the export's tokens", flow.out.parent.name, budgeted[-1].get("tokens_kept"), rec["export_tokens"])
    write_json(path, rec)
    write_json(flow.out.parent / "selection.json", {"selection": selection.name, "budget": budget, "select": steps,
                                                    "flow": str(spec.resolve(spec.flow))})
    return {**rec, "flow": flow}


def natural_steps(spec: CompareSpec, tokens: int) -> int:
    """Optimizer steps of ``train.epochs`` over ``tokens`` tokens at ``train.batch_tokens`` per step (at least 1)."""
    return max(1, math.ceil(spec.train.epochs * tokens / spec.train.batch_tokens))


def steps_per_pass(spec: CompareSpec, budget: int | float) -> int | None:
    """With ``budget_unit: tokens``, the optimizer steps of one pass over a selection: budget / batch_tokens, halves up."""
    return max(1, math.floor(budget / spec.train.batch_tokens + 0.5)) if spec.budget_unit == "tokens" else None


def budget_steps(spec: CompareSpec, budget: int | float, curated: list[dict[str, Any]]) -> int:
    """The optimizer steps of every cell at ``budget`` (see the module docstring), capped by ``train.max_steps``."""
    if spec.budget_unit == "tokens":
        steps = max(1, math.floor(spec.train.epochs * steps_per_pass(spec, budget) + 0.5))
    else:
        steps = min(natural_steps(spec, c["export_tokens"]) for c in curated)
    return min(steps, spec.train.max_steps) if spec.train.max_steps else steps


def run_cell(spec: CompareSpec, selection: Selection, budget: int | float, seed: int, curated: dict[str, Any],
             steps: int) -> dict[str, Any]:
    """Train and evaluate one seed of a curated selection × budget (or read it back when its key is recorded)."""
    from curate.io import write_json

    flow = curated["flow"]
    train = spec.train.model_copy(update={"seed": seed, "max_steps": steps, "steps_per_epoch": steps_per_pass(spec, budget)})
    evaluation = spec.eval.model_copy(update={"seed": seed})
    key = cell_key(flow, spec, train, evaluation)
    cell_dir = flow.out.parent.parent / cell_name(selection, budget, seed)
    record_path = cell_dir / "cell.json"
    old = _recorded(record_path, key)
    if old:
        return old
    log.info("compare: cell %s (%d steps)", cell_dir.name, steps)
    if not curated["selected"]:
        raise ConfigError(f"compare: selection '{selection.name}' keeps no row at budget {budget} ({flow.out}): nothing to train on")
    spe, n = train.steps_per_epoch, curated["selected"]
    if spe and math.ceil(n / math.ceil(n / spe)) != spe:
        log.warning("compare: %s: %d rows cannot make %d equal steps a pass (%d rows a step make %d): its %d steps run "
                    "past %s passes, so it trains more tokens than the other cells", cell_dir.name, n, spe, math.ceil(n / spe),
                    math.ceil(n / math.ceil(n / spe)), steps, spec.train.epochs)
    trained = _train(spec, train, flow.out)
    evaluated = _eval(spec, evaluation, trained["weights"], flow.local_store)
    from curate.evaluate.run import default_out

    if trained.get("tokens_trained") is not None:
        tokens, source = trained["tokens_trained"], "trainer"
    else:
        tokens, source = trained["batch"]["total_tokens"] * (trained.get("epochs") or 0.0), "estimate"
    record = {
        "key": key, "cell": cell_dir.name, "selection": selection.name, "budget": budget, "seed": seed, "select": curated["select"],
        "curation": {"config_hash": curated["config_hash"], "selected": curated["selected"], "output_dir": str(flow.out),
                     "export_tokens": curated["export_tokens"]},
        "train": {"dir": str(Path(trained["weights"]).parent), "key": trained["key"], "steps": trained["steps"], "max_steps": steps,
                  "seed": seed, "tokens_trained": tokens, "tokens_trained_from": source, "epochs": trained.get("epochs"),
                  "rows_per_step": trained["batch"]["rows_per_step"], "batch_tokens": trained["batch"]["batch_tokens"],
                  "first_loss": trained["first_loss"], "last_loss": trained["last_loss"], "seconds": trained["seconds"],
                  "tokens_per_s": trained["tokens_per_s"]},
        "eval": {"key": evaluated["key"], "dir": str(default_out(trained["weights"], evaluated["key"])), "seed": seed,
                 "loss": evaluated.get("loss"), "judge": evaluated.get("judge"), "generation": evaluated.get("generation")},
    }
    write_json(record_path, record)
    return record


def _recorded(record_path: Path, key: str) -> dict[str, Any] | None:
    """The cell record at ``record_path`` when it was made with ``key`` (then the cell is not run again)."""
    if record_path.exists():
        old = json.loads(record_path.read_text())
        if old.get("key") == key:
            log.info("compare: cell %s is recorded, not run again", record_path.parent.name)
            return old
    return None


def base_cell(spec: CompareSpec, seed: int, store: Path) -> dict[str, Any]:
    """Evaluate the untrained ``train.model`` with the eval settings under ``seed`` (or read it back)."""
    from curate.io import write_json
    from curate.models import model_revision

    evaluation = spec.eval.model_copy(update={"seed": seed})
    key = sha256_hex(canonical_json({"base_model": spec.train.model, "revision": spec.train.revision,
                                     "model_revision": model_revision(spec.train.model, spec.train.revision),
                                     "eval": key_dump(evaluation, HOW), "eval_backend": evaluation.resolved_backend(),
                                     "files": _content(None, spec)}))
    cell_dir = spec.resolve(spec.output_dir) / "cells" / f"{BASE_DIR}-s{seed}"
    record_path = cell_dir / "cell.json"
    old = _recorded(record_path, key)
    if old:
        return old
    log.info("compare: cell %s (the untrained %s)", cell_dir.name, spec.train.model)
    evaluated = _eval(spec, evaluation, spec.train.model, store, out_dir=cell_dir / "eval")
    record = {"key": key, "cell": cell_dir.name, "selection": BASE, "budget": None, "seed": seed, "select": None,
              "curation": {"selected": 0, "export_tokens": 0},
              "train": {"steps": 0, "max_steps": 0, "seed": seed, "tokens_trained": 0, "tokens_trained_from": "untrained",
                        "first_loss": None, "last_loss": None, "model": spec.train.model},
              "eval": {"key": evaluated["key"], "dir": str(cell_dir / "eval"), "seed": seed, "loss": evaluated.get("loss"),
                       "judge": evaluated.get("judge"), "generation": evaluated.get("generation")}}
    write_json(record_path, record)
    return record


def _train(spec: CompareSpec, train: TrainSpec, run_dir: Path) -> dict[str, Any]:
    if spec.prefect:
        from curate.train.flow import train_flow

        return train_flow(spec=train.model_dump(mode="json"), source=str(run_dir))
    from curate.train import train as train_fn

    return train_fn(train, run_dir)


def _eval(spec: CompareSpec, evaluation: EvalSpec, model: str, store: Path, out_dir: Path | None = None) -> dict[str, Any]:
    base = str(Path(spec.path).parent)
    out = None if out_dir is None else str(out_dir)
    if spec.prefect:
        from curate.evaluate.flow import eval_flow

        return eval_flow(model=model, spec=evaluation.model_dump(mode="json"), out_dir=out, store_dir=str(store), base_dir=base)
    from curate.evaluate import evaluate

    return evaluate(model, evaluation, out_dir=out, store_dir=store, base_dir=base)


# -- the table ----------------------------------------------------------------------------------------


def _judge(c: dict[str, Any]) -> dict[str, Any]:
    return c["eval"].get("judge") or {}


def judge_status(judge: dict[str, Any]) -> str | None:
    """The judge column in words: "valid", "NOT VALID" or None (no judge)."""
    if not judge:
        return None
    return "valid" if judge.get("valid", True) else "NOT VALID"


def _span(ci: list[float] | None) -> str | None:
    return None if not ci else f"{ci[0]:.4f}–{ci[1]:.4f}"


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _int(x: float | None) -> int | None:
    return None if x is None else int(round(x))


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v and len(v) == len(values) else None


def per_seed_table(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell and seed, as each eval reported it (its own intervals: over the eval rows only)."""
    rows = []
    for c in cells:
        loss = c["eval"].get("loss") or {}
        judge = _judge(c)
        gen = c["eval"].get("generation") or {}
        rows.append({"selection": c["selection"], "budget": c["budget"], "seed": c.get("seed"), "selected": c["curation"]["selected"],
                     "train_steps": c["train"]["steps"], "train_tokens": _int(c["train"].get("tokens_trained")),
                     "train_loss_first": _r(c["train"]["first_loss"]), "train_loss_last": _r(c["train"]["last_loss"]),
                     "eval_loss": _r(loss.get("loss")), "eval_loss_ci95": _span(loss.get("ci95")), "eval_ppl": _r(loss.get("ppl")),
                     "judge": judge_status(judge), "win_rate": _r(judge.get("win_rate")),
                     "win_rate_ci95": _span((judge.get("ci95") or {}).get("win_rate")),
                     "lc_win_rate": _r(judge.get("lc_win_rate")), "soft_win_rate": _r(judge.get("soft_win_rate")),
                     "first_position_rate": _r(judge.get("first_position_rate")), "consistent": _r(judge.get("consistent")),
                     "avg_length": _r(gen.get("avg_length"), 1), "truncated": _r(gen.get("truncated_rate")),
                     "judged": judge.get("n_judged")})
    return rows


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def row_values(cell: dict[str, Any], metric: str) -> dict[str, tuple[float, float]]:
    """Per eval row id: (numerator, denominator) of ``metric`` in this cell's eval — ``eval_loss``: the
    row's nats and scored tokens (losses.jsonl); ``win_rate``: the row's points (both orders judged,
    ties ½) and 1 (judgments.jsonl). Empty when the cell has no such metric; a cell that reports the
    metric but whose per-row file is gone raises ConfigError (its intervals cannot be drawn)."""
    d = Path(cell["eval"].get("dir") or "")
    out: dict[str, tuple[float, float]] = {}
    name = "losses.jsonl" if metric == "eval_loss" else "judgments.jsonl"
    has = cell["eval"].get("loss") if metric == "eval_loss" else _judge(cell)
    if has and not (d / name).exists():
        raise ConfigError(f"compare: cell {cell.get('cell')} reports {metric} but {d / name} is missing: its per-row values "
                          "give the intervals and paired differences; delete the cell's cell.json to run it again")
    if metric == "eval_loss":
        for r in _jsonl(d / "losses.jsonl"):
            if r.get("loss") is not None and r.get("n_tokens"):
                out[r["id"]] = (r["loss"] * r["n_tokens"], float(r["n_tokens"]))
    else:
        for r in _jsonl(d / "judgments.jsonl"):
            a, b = r.get("points_model_first"), r.get("points_model_second")
            if a is not None and b is not None:
                out[r["id"]] = ((a + b) / 2, 1.0)
    return out


def _matrices(arms: list[list[dict[str, Any]]], metric: str):
    """(num, den) per arm, each (n_seeds, n_rows), over the eval rows every seed of every arm has, in
    eval-row order, and the seeds paired by position (the same seed list for every arm)."""
    import numpy as np

    per = [[row_values(c, metric) for c in cells] for cells in arms]
    first = per[0][0] if per and per[0] else {}
    ids = [i for i in first if all(i in v for vals in per for v in vals)]
    out = []
    for vals in per:
        num = np.array([[v[i][0] for i in ids] for v in vals], dtype=float).reshape(len(vals), len(ids))
        den = np.array([[v[i][1] for i in ids] for v in vals], dtype=float).reshape(len(vals), len(ids))
        out.append((num, den))
    return out


def _valid(cells: list[dict[str, Any]]) -> bool:
    """The judge is present and valid in every one of these cells."""
    return bool(cells) and all(_judge(c) and _judge(c).get("valid", True) for c in cells)


def _groups(cells: list[dict[str, Any]]) -> list[tuple[str, Any, list[dict[str, Any]]]]:
    """(selection, budget, its cells in seed order), in the order the cells came."""
    out: dict[tuple[str, str], tuple[str, Any, list]] = {}
    for c in cells:
        out.setdefault((c["selection"], json.dumps(c["budget"])), (c["selection"], c["budget"], []))[2].append(c)
    for _, _, cs in out.values():
        cs.sort(key=lambda c: c.get("seed") or 0)
    return list(out.values())


def aggregate(spec: CompareSpec, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per selection × budget: means over the seeds and the seed-and-row bootstrap intervals (raw values)."""
    from curate.evaluate import stats

    out = []
    for sel, budget, cs in _groups(cells):
        g: dict[str, Any] = {"selection": sel, "budget": budget, "cells": cs, "seeds": [c.get("seed") for c in cs]}
        for metric in ("eval_loss", "win_rate"):
            if metric == "win_rate" and not _valid(cs):
                g[metric] = g[f"{metric}_ci95"] = None
                continue
            ((num, den),) = _matrices([cs], metric)
            b = stats.seed_row_bootstrap(num, den, spec.eval.bootstrap, spec.eval.seed)
            g[metric], g[f"{metric}_ci95"], g[f"{metric}_rows"] = b["value"], b["ci95"], b["n_rows"]
            if not b["n_rows"]:  # no per-row file to read (an eval without them): the mean of the evals' own values, no interval
                own = [(c["eval"].get("loss") or {}).get("loss") if metric == "eval_loss" else _judge(c).get("win_rate") for c in cs]
                g[metric] = _mean(own)
        for metric in ("lc_win_rate", "soft_win_rate"):
            g[metric] = _mean([_judge(c).get(metric) for c in cs]) if _valid(cs) else None
            vals = [x for x in ((_judge(c).get("ci95") or {}).get(metric) for c in cs) if x]
            g[f"{metric}_ci95"] = None if len(cs) > 1 or not vals or not _valid(cs) else vals[0]  # one seed: the eval's own interval
        out.append(g)
    return out


def differences(spec: CompareSpec, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At each budget, each selection against the random baseline and the base model: the paired
    difference (selection − baseline) of the held-out loss, and of the win rate where the judge is
    valid in both, with its 95% paired bootstrap interval and a verdict."""
    from curate.evaluate import stats

    groups = _groups(cells)
    base = next((cs for sel, _, cs in groups if sel == BASE), None)
    out = []
    for sel, budget, cs in groups:
        if sel == BASE:
            continue
        against = []
        rnd = next((rc for s, b, rc in groups if s == RANDOM and b == budget), None)
        if rnd is not None and sel != RANDOM:
            against.append((RANDOM, rnd))
        if base is not None:
            against.append((BASE, base))
        for name, other in against:
            paired = {c.get("seed"): c for c in other}
            ours = [c for c in cs if c.get("seed") in paired]
            theirs = [paired[c.get("seed")] for c in ours]
            for metric, lower_is_better in (("eval_loss", True), ("win_rate", False)):
                if metric == "win_rate" and not (_valid(ours) and _valid(theirs)):
                    continue
                (an, ad), (bn, bd) = _matrices([ours, theirs], metric) if ours else ((None, None), (None, None))
                if an is None or not an.size:
                    continue
                d = stats.paired_difference(an, ad, bn, bd, spec.eval.bootstrap, spec.eval.seed)
                out.append({"budget": budget, "selection": sel, "against": name, "metric": metric,
                            "difference": d["difference"], "ci95": d["ci95"], "per_seed": d["per_seed"],
                            "verdict": verdict(d, lower_is_better), "n_rows": d["n_rows"], "n_seeds": d["n_seeds"]})
    return out


def verdict(d: dict[str, Any], lower_is_better: bool) -> str:
    """"better" / "worse" only when the paired interval excludes 0; otherwise "no difference shown". The random baseline is one draw,
curated once and trained with every seed: the intervals hold the seeds' and the eval rows' variation, not
that of another random draw."""
    if not d.get("excludes_zero"):
        return "no difference shown"
    below = d["ci95"][1] < 0
    return "better" if below == lower_is_better else "worse"


def table(spec: CompareSpec, cells: list[dict[str, Any]], diffs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per selection × budget (the base model: one row), each metric the mean over the seeds."""
    diffs = differences(spec, cells) if diffs is None else diffs
    rows = []
    for g in aggregate(spec, cells):
        cs = g["cells"]
        judge = [_judge(c) for c in cs]
        gens = [c["eval"].get("generation") or {} for c in cs]
        valid = _valid(cs)
        tokens = [c["train"].get("tokens_trained") for c in cs]
        froms = sorted({c["train"].get("tokens_trained_from", "estimate") for c in cs})

        def verdict_of(against: str, metric: str = "eval_loss") -> str | None:
            return next((d["verdict"] for d in diffs if d["selection"] == g["selection"] and d["budget"] == g["budget"]
                         and d["against"] == against and d["metric"] == metric), None)

        loss = g["eval_loss"]
        rows.append({"selection": g["selection"], "budget": g["budget"], "seeds": len(cs), "selected": cs[0]["curation"]["selected"],
                     "selected_tokens": cs[0]["curation"].get("export_tokens"),
                     "train_steps": _steps([c["train"]["steps"] for c in cs]), "train_tokens": _int(_mean(tokens)),
                     "train_tokens_from": "/".join(froms),
                     "train_loss_first": _r(_mean([c["train"]["first_loss"] for c in cs])),
                     "train_loss_last": _r(_mean([c["train"]["last_loss"] for c in cs])),
                     "eval_loss": _r(loss), "eval_loss_ci95": _span(g["eval_loss_ci95"]),
                     "eval_ppl": _r(math.exp(loss) if loss is not None else None),
                     "loss_vs_random": verdict_of(RANDOM), "loss_vs_base": verdict_of(BASE),
                     "judge": None if not any(judge) else ("valid" if valid else "NOT VALID"),
                     "win_rate": _r(g["win_rate"]), "win_rate_ci95": _span(g["win_rate_ci95"]),
                     "win_vs_random": verdict_of(RANDOM, "win_rate"),
                     "lc_win_rate": _r(g["lc_win_rate"]), "soft_win_rate": _r(g["soft_win_rate"]),
                     "first_position_rate": _r(_mean([j.get("first_position_rate") for j in judge])),
                     "consistent": _r(_mean([j.get("consistent") for j in judge])),
                     "avg_length": _r(_mean([x.get("avg_length") for x in gens]), 1),
                     "truncated": _r(_mean([x.get("truncated_rate") for x in gens])),
                     "judged": _r(_mean([j.get("n_judged") for j in judge]), 1)})
    if rows and all(r["win_vs_random"] is None for r in rows):  # no valid judge anywhere: not a column of its own
        for r in rows:
            del r["win_vs_random"]
    return rows


def _steps(steps: list[int]) -> int | float:
    """The seeds' optimizer steps: the number when they agree (they do unless a run stopped early), else their mean."""
    return steps[0] if len(set(steps)) == 1 else round(sum(steps) / len(steps), 1)


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


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:+.4f}"


def markdown(spec: CompareSpec, rows: list[dict[str, Any]], cells: list[dict[str, Any]] | None = None,
             diffs: list[dict[str, Any]] | None = None) -> str:
    cols = list(rows[0]) if rows else []
    seeds = ", ".join(str(s) for s in spec.seeds)
    lines = [f"# compare: {spec.name}", "", spec.description, "",
             f"Pool: `{spec.flow}`; budgets in {spec.budget_unit}; seeds {seeds}; train: {spec.train.method} on `{spec.train.model}` "
             f"({spec.train.layout}, {spec.train.batch_tokens} tokens per step); "
             f"eval: `{spec.eval.eval_set.path or spec.eval.eval_set.hub}`"
             + (f"; judge: `{spec.eval.judge.model}` ({spec.eval.judge.mode})." if spec.eval.judge else "."), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "Each row: the mean over its seeds (the base model: the untrained model, evaluated once per seed). "
              + ("Every cell at one budget trains the same number of optimizer steps (`train_steps`), each pass over its rows in "
                 "budget / batch_tokens steps, each row once a pass; the budget counts tokens as the trainer does; "
                 if spec.budget_unit == "tokens" else
                 f"Every cell at one budget trains the same number of optimizer steps (`train_steps`) of about {spec.train.batch_tokens} "
                 "tokens each; ")
              + "`train_tokens`: the tokens the trainer saw "
              "(`train_tokens_from`: `trainer` when the train record counts them, `estimate` = the export's tokens × the epochs trained). "
              "`selected_tokens`: the export's tokens under the training tokenizer.",
              "",
              f"Intervals (`_ci95`): a 95% percentile bootstrap ({spec.eval.bootstrap} resamples, seed {spec.eval.seed}); each resample "
              "draws the eval rows and the seeds with replacement and takes the mean over the drawn seeds of the metric on the drawn rows "
              "(held-out loss: token-weighted; win rate: the mean of each row's points, ties ½). With one seed it is the row bootstrap. "
              "Lengths in characters; truncated: the share of answers cut by the token limit."]
    diffs = diffs or []
    if diffs:
        lines += ["", "## Paired differences", "",
                  "Selection minus baseline at the same budget, on the same eval rows and seeds: the mean over seeds of the "
                  "difference, and a 95% paired bootstrap interval (the same rows and seeds drawn for both). Held-out loss: lower "
                  "is better; win rate: higher is better. \"better\" / \"worse\" only when the interval excludes 0; otherwise "
                  "\"no difference shown\" (which is not evidence that they are equal). The random baseline is one draw trained with "
                  "every seed: the interval holds the seeds' and the eval rows' variation, not another random draw's.", "",
                  "| budget | selection | against | metric | difference | 95% interval | verdict | rows | seeds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in diffs:
            ci = "–" if not d["ci95"] else f"{d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f}"
            lines.append(f"| {d['budget']} | {d['selection']} | {d['against']} | {d['metric']} | {_fmt(d['difference'])} | {ci} | "
                         f"{d['verdict']} | {d['n_rows']} | {d['n_seeds']} |")
    note = judge_note(cells or [])
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


#: plotted metrics: (label, key in an aggregate group); the judge's rates are null where it is not valid
METRICS = (("held-out loss (nats/token)", "eval_loss"), ("win rate vs reference", "win_rate"),
           ("length-controlled win rate", "lc_win_rate"), ("soft win rate vs reference", "soft_win_rate"))
JUDGE_METRICS = ("win_rate", "lc_win_rate", "soft_win_rate")


def plot(spec: CompareSpec, cells: list[dict[str, Any]], path: Path) -> None:
    import textwrap

    from curate.plotting import pyplot, save_png

    plt = pyplot()
    groups = aggregate(spec, cells)
    judged = any(_judge(c) for c in cells)
    metrics = [(label, key) for label, key in METRICS
               if any(g.get(key) is not None for g in groups) or (judged and key == JUDGE_METRICS[0])]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.5 * max(1, len(metrics)), 3.6), dpi=100, squeeze=False)
    invalid = sorted({r for c in cells for r in (_judge(c).get("invalid_reasons") or [])})
    for ax, (label, key) in zip(axes[0], metrics):
        for sel in dict.fromkeys(g["selection"] for g in groups):
            pts = sorted(((g["budget"], g[key], g.get(f"{key}_ci95")) for g in groups if g["selection"] == sel and g.get(key) is not None),
                         key=lambda p: (p[0] is None, p[0] or 0))
            if not pts:
                continue
            if sel == BASE:
                y, ci = pts[0][1], pts[0][2]
                ax.axhline(y, color="0.3", linestyle="--", linewidth=1, label=BASE)
                if ci:
                    ax.axhspan(ci[0], ci[1], color="0.5", alpha=0.15)
                continue
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            err = [[p[1] - p[2][0] if p[2] else 0 for p in pts], [p[2][1] - p[1] if p[2] else 0 for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=sel)
        if key in JUDGE_METRICS and invalid:
            n_bad = sum(1 for c in cells if _judge(c) and not _judge(c).get("valid", True))
            text = f"judge not valid in {n_bad} of {len(cells)} cells (no win rate):\n" + "\n".join(
                textwrap.fill(r, 48) for r in invalid[:4]) + ("\n… (compare.md)" if len(invalid) > 4 else "")
            ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", ha="left", fontsize=6.5, color="#a00000", wrap=True)
        ax.set_xlabel(f"budget ({spec.budget_unit})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"mean over seeds {', '.join(str(s) for s in spec.seeds)}; 95% bootstrap over eval rows and seeds", fontsize=8)
    save_png(fig, path)


def compare(spec: CompareSpec, on_cell: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Curate, train and evaluate every cell (or read it back), then write the table, the plot and the artifacts.

    ``on_cell``, when given, is called after every cell with the cell records so far (the base model's
    first): e.g. to write a partial table that survives a run stopped half way (bench/gpu_check.sh)."""
    from curate.io import write_json, write_text

    out = spec.resolve(spec.output_dir)
    sels = selections(spec)
    base: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    budget_info = []
    store = None
    for budget in spec.budgets:
        curated = [curate_cell(spec, sel, budget) for sel in sels]  # every selection of the budget first: the steps depend on them all
        steps = budget_steps(spec, budget, curated)
        store = store or curated[0]["flow"].local_store
        budget_info.append({"budget": budget, "unit": spec.budget_unit, "train_steps": steps,
                            "export_tokens": {sel.name: c["export_tokens"] for sel, c in zip(sels, curated)}})
        log.info("compare: budget %s %s: %d optimizer steps for every cell", budget, spec.budget_unit, steps)
        if spec.baselines.base_model and not base:  # the reference first: a partial table already has it
            for seed in spec.seeds:
                base.append(base_cell(spec, seed, store))
                if on_cell:
                    on_cell(base + cells)
        for sel, cur in zip(sels, curated):
            for seed in spec.seeds:
                cells.append(run_cell(spec, sel, budget, seed, cur, steps))
                if on_cell:
                    on_cell(base + cells)
    cells = base + cells
    diffs = differences(spec, cells)
    rows = table(spec, cells, diffs)
    md = markdown(spec, rows, cells, diffs)
    write_text(out / "compare.md", md)
    write_json(out / "compare.json", {"name": spec.name, "budget_unit": spec.budget_unit, "seeds": spec.seeds, "budgets": budget_info,
                                      "table": rows, "differences": diffs, "per_seed": per_seed_table(cells), "cells": cells})
    plot(spec, cells, out / "compare.png")
    if spec.prefect:
        _publish(spec, md, rows)
    return {"output_dir": str(out), "table": rows, "differences": diffs, "cells": cells}


def _publish(spec: CompareSpec, md: str, rows: list[dict[str, Any]]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    create_markdown_artifact(key=f"curate-compare-{spec.name}", markdown=md, description=f"curate compare: {spec.name}")
    create_table_artifact(key=f"curate-compare-table-{spec.name}", table=rows,
                          description="one row per selection × budget: means over the seeds, 95% intervals over eval rows and seeds")
