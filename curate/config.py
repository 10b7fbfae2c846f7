"""The flow spec: one YAML file, validated by pydantic.

Unknown keys and bad values are errors that name the file, the field path and the YAML line (and the
``--set`` item when an override gave the value)::

    flows/select.yaml:23: select[1].budget: budget must be at least 1 row, got 0 (from --set select[1].budget=0)

Everything else a flow refers to is checked when it is read, before any row is: the scores its
selection steps read (with the closest name), budgets and rates, the output folder
(:func:`check_flow` repeats the checks that need the flow as it will run, for ``curate plan`` and the
start of a run).

Relative paths resolve against ``base_dir``, which is itself relative to the flow file's folder
(``base_dir: ..`` in ``flows/select.yaml`` makes paths relative to the project root).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from curate.embed.spec import EmbedSpec
from curate.errors import ConfigError
from curate.records import canonical_json, drop_defaults, sha256_hex
from curate.train.spec import TrainSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrecomputedEmbedding(Strict):
    """Embeddings made elsewhere, carried into the store at ingest under their producer's name."""

    producer: str = Field(description="Who made the vectors (a model id, e.g. 'BAAI/bge-small-en-v1.5'); recorded in the store "
                          "and matched by `embed: {method: precomputed, model: <producer>}`.")
    field: str | None = Field(None, description="The rows' column that holds the vector (a list of numbers).")
    path: str | None = Field(None, description="A side file of vectors (Parquet with columns `id` and `vector`), relative to base_dir.")
    id_field: str = Field("id", description="With `path`: the rows' field whose value is the side file's `id`.")

    @model_validator(mode="after")
    def _one_place(self):
        if (self.field is None) == (self.path is None):
            raise ValueError("give exactly one of 'field' (a column of the rows) or 'path' (a side file of vectors)")
        return self


class InputSpec(Strict):
    """One input: a file, a glob, a saved HF dataset dir, or a hub dataset id."""

    path: str | None = Field(None, description="File, glob or saved HF dataset dir, relative to base_dir.")
    hub: str | None = Field(None, description="A Hugging Face hub dataset id (needs network).")
    split: str = "train"
    revision: str | None = None
    name: str | None = Field(None, description="Source name in provenance columns; default: the file stem.")
    format: Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion"] = "auto"
    fields: dict[str, str] = Field(default_factory=dict, description="Canonical field -> source column.")
    json_field: str | None = Field(None, description="For a JSON object file: the key that holds the records.")
    delimiter: str | None = Field(None, description="CSV/TSV: the character between columns (',', ';', '|', 'tab'); "
                                  "default: detected from the header.")
    task: str | None = Field(None, description="A constant task label for every row of this input.")
    task_field: str | None = Field(None, description="Column that holds each row's task label.")
    limit: int | None = Field(None, gt=0, description="Read only the first N rows (per file).")
    embedding: PrecomputedEmbedding | None = Field(
        None, description="Vectors that come with this input (a column of its rows, or a side file keyed by an id field); "
        "`embed: {method: precomputed, model: <producer>}` uses them instead of computing embeddings.")
    keep_columns: Literal["all", "none"] | list[str] = Field(
        "none", description="The input's own columns to carry beside the conversation into the ledger and every export file: "
        "`all` (every column the reader did not map to the conversation), `none`, or a list of names. The user's `id` becomes "
        "`source_id`; docs/exports.md. Default `none`: exports stay as they were.")
    license: str | None = Field(None, description="The input's licence as a Hub licence id (apache-2.0, cc-by-4.0, cc-by-nc-4.0, "
                                "mit, other, …): written into the export's dataset card (README.md).")

    @field_validator("keep_columns")
    @classmethod
    def _column_names(cls, v):
        if isinstance(v, list):
            if not v or any(not isinstance(c, str) or not c for c in v):
                raise ValueError("keep_columns: give all, none, or a non-empty list of column names")
            if len(set(v)) != len(v):
                raise ValueError(f"keep_columns names a column twice: {sorted(c for c in set(v) if v.count(c) > 1)}")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' or 'hub'")
        return self


class IngestSpec(Strict):
    shard_size: int = Field(10_000, gt=0, description="Rows per shard: the unit of work and of resume.")
    max_chars: int | None = Field(None, gt=0, description="Quarantine conversations longer than this.")
    dedup: bool = Field(True, description="Filter exact duplicates (same sample_id), keeping the first row.")


class StepSpec(BaseModel):
    """A scorer or selection step: ``method`` picks the class, the other keys are its parameters."""

    model_config = ConfigDict(extra="allow")
    method: str
    name: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def label(self) -> str:
        return self.name or self.method


class RewriteSpec(Strict):
    """Make new rows from the selected ones, re-score them, and select again (methods.md Part C)."""

    steps: list[StepSpec] = Field(min_length=1,
                                  description="Rewrite steps (curate/rewrite/__init__.py lists them), each applied to the selection.")
    pool: Literal["derived", "selected_and_derived"] = Field(
        "derived", description="Who meets the next selection: the derived rows (and the originals no step used), "
        "or every selected original too.")
    select: list[StepSpec] = Field(default_factory=list, description="Selection steps over that pool, after re-scoring (empty: keep all).")


class ExportSpec(Strict):
    dir: str = Field("export", description="Relative to output_dir.")
    name: str = Field("curated", pattern=r"^[A-Za-z0-9_.-]+$")
    layouts: list[Literal["messages", "prompt_completion", "alpaca", "sharegpt"]] = Field(
        default_factory=lambda: ["messages", "alpaca", "sharegpt"]
    )
    file_types: list[Literal["jsonl", "parquet"]] = Field(default_factory=lambda: ["jsonl", "parquet"])
    extra_columns: bool = Field(True, description="Add provenance and score columns to the training files.")
    max_length: int = Field(2048, gt=0, description="Sequence length written into the trainer configs.")


class ReportSpec(Strict):
    enabled: bool = True
    plots: bool = True
    max_points: int = Field(5000, gt=0, description="Points drawn in the embedding map.")
    sample_rows: int = Field(3, ge=0, description="Rows shown per outcome and reason in the report's rows section "
                             "(the first by row number); 0: no rows section.")


class RuntimeSpec(Strict):
    prefect: bool = Field(True, description="Run as a Prefect flow (false: the same stages, in-process).")
    workers: int = Field(1, gt=0, description="Prefect thread-pool size; model stages run one at a time.")
    ingest_workers: int = Field(1, gt=0, description="Processes that parse and validate input files (chunks of large files in parallel).")
    task_runner: Literal["threads", "dask", "ray"] = Field(
        "threads", description="Where Prefect runs the shard tasks: a thread pool here, or a Dask / Ray cluster "
        "(pip install 'curate[cluster]').")
    address: str | None = Field(None, description="An existing Dask scheduler or Ray cluster to use (e.g. 'tcp://10.0.0.5:8786', "
                                "'ray://head:10001'); without it, dask/ray start a local cluster for the run.")
    torch_threads: int | None = Field(None, gt=0, description="Default: min(2, CPU count).")
    progress: bool | None = Field(None, description="Progress bars; default: on in a terminal, off under CI.")
    progress_interval_s: float = Field(30.0, ge=0, description="Without bars (CI, a log file, a Prefect worker, --quiet): one line "
                                       "per running stage this often, with rows done, rate and time left; 0: none.")
    commit_interval_s: float = Field(30.0, ge=0, description="A score or embed shard that runs longer than this stores the rows it "
                                     "has computed at the end of its next batch (and so on), so a killed run loses at most about this "
                                     "much of a shard's work; 0: after every batch. Outputs do not depend on it.")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="A stage fails above this fraction of failed rows.")
    versioned: bool = Field(False, description="Each run writes output_dir/runs/<number>-<UTC time>/ "
                            "and then points output_dir/latest at it "
                            "(atomically); curate serve turns it on.")


class FlowSpec(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Lowercase letters, digits and dashes.")
    description: str = ""
    base_dir: str = Field(".", description="Relative paths resolve against this, itself relative to the flow file.")
    output_dir: str = Field("out/{name}", description="Where the run writes its files ({name} = flow name).")
    store_dir: str = Field(".curate/store", description="The content-addressed score and embedding store: a path, or an fsspec URL "
                                                         "(s3://bucket/store) that every worker of a cluster reaches.")
    seed: int = 0
    inputs: list[InputSpec] = Field(min_length=1)
    ingest: IngestSpec = Field(default_factory=IngestSpec)
    score: list[StepSpec] = Field(default_factory=list)
    embed: EmbedSpec | None = None
    select: list[StepSpec] = Field(default_factory=list, description="Steps, or a preset name from selectors/.")
    rewrite: RewriteSpec | None = None
    export: ExportSpec = Field(default_factory=ExportSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    train: TrainSpec | None = Field(None, description="Fine-tune on the export after the run (curate.train; its own Prefect flow run).")

    # Set by load_flow, not by the YAML.
    flow_path: str | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _precomputed_embeddings_are_used(self):
        for i, inp in enumerate(self.inputs):
            emb = inp.embedding
            if emb is None:
                continue
            e = self.embed
            if e is None or e.method != "precomputed" or e.model != emb.producer:
                now = "there is no embed section" if e is None else f"embed has method '{e.method}', model '{e.model}'"
                raise ValueError(f"inputs[{i}] carries embeddings made by '{emb.producer}': set `embed: {{method: precomputed, "
                                 f"model: {emb.producer}}}` ({now})")
        return self

    @model_validator(mode="after")
    def _train_reads_an_exported_file(self):
        t, e = self.train, self.export
        if t is not None and (t.layout not in e.layouts or t.file_type not in e.file_types):
            raise ValueError(f"train reads the {t.layout} {t.file_type} export: add '{t.layout}' to export.layouts and "
                             f"'{t.file_type}' to export.file_types, or set train.layout / train.file_type")
        return self

    @field_validator("output_dir")
    @classmethod
    def _output_dir_is_local(cls, v: str) -> str:
        from curate.io import is_url

        if is_url(v):
            raise ValueError(f"output_dir {v!r}: must be a local (or mounted) path — the run writes its selection, ledgers and "
                             "exports there with atomic renames; only store_dir may be a URL")
        return v

    @field_validator("score")
    @classmethod
    def _unique_scorer_names(cls, v: list[StepSpec]):
        seen = set()
        for s in v:
            if s.label in seen:
                raise ValueError(f"two scorers are named '{s.label}': give one a distinct 'name'")
            seen.add(s.label)
        return v

    # -- resolved paths ---------------------------------------------------------------------------
    @property
    def base(self) -> Path:
        root = Path(self.flow_path).parent if self.flow_path else Path.cwd()
        return (root / self.base_dir).resolve()

    def resolve(self, path: str) -> Path:
        p = Path(os.path.expanduser(path.format(name=self.name)))
        return p if p.is_absolute() else (self.base / p).resolve()

    @property
    def out(self) -> Path:
        return self.resolve(self.output_dir)

    @property
    def store(self) -> Path:
        """The store: a local path, or for an fsspec URL (``s3://bucket/store``) a ``upath.UPath``."""
        from curate.io import is_url, location

        return location(self.store_dir.format(name=self.name)) if is_url(self.store_dir) else self.resolve(self.store_dir)

    @property
    def local_store(self) -> Path:
        """Where the caches that only the flow's process uses go (the ingest chunk cache, the rewrite steps'
        LLM calls and units, ``curate compare``'s eval calls): the store itself when it is a local path; for
        a URL store, ``$CURATE_CACHE_DIR/stores/<hash of the URL>``."""
        from curate.io import is_url

        if not is_url(self.store_dir):
            return self.store
        from curate.models import cache_dir
        from curate.records import sha256_hex

        return cache_dir() / "stores" / sha256_hex(str(self.store))[:24]

    def fingerprint(self) -> str:
        """Hash of what the run computes: inputs, stages, parameters, seed. Where it writes
        (output_dir, store_dir), how it runs (runtime) and the report settings are left out, so the
        same work in another folder has the same hash."""
        exclude = {"flow_path", "output_dir", "store_dir", "runtime", "report", "description", "train"}
        # keys added in later versions enter the hash only when set, so a flow keeps its hash
        data = drop_defaults(self.model_dump(mode="json", exclude=exclude), {"rewrite": None})
        if data.get("embed"):
            data["embed"] = drop_defaults(data["embed"], {"method": "sentence_transformers", "storage": "float32", "quantize": "none"})
            if data["embed"].get("backend") in ("auto", "torch"):  # the hash flows had before embed.backend existed
                data["embed"].pop("backend")
        if "inputs" in data:
            data["inputs"] = [drop_defaults(inp, {"embedding": None, "delimiter": None, "license": None, "keep_columns": "none"})
                              for inp in data["inputs"]]
        return sha256_hex(canonical_json(data))


# -- loading --------------------------------------------------------------------------------------


#: the key part ``[+]`` (or ``.+``): append a new item to a list (see :func:`parse_override`)
APPEND = "+"
_KEY_PART = re.compile(r"\[([^\]]*)\]|([^.\[\]]+)")


def _key_parts(key: str, item: str) -> list[str | int]:
    """``select[2].budget`` / ``select.2.budget`` / ``select[-1].budget`` / ``select[+]`` -> parts."""
    parts: list[str | int] = []
    pos, key = 0, key.strip()
    while pos < len(key):
        if key[pos] == "." and parts:
            pos += 1
        m = _KEY_PART.match(key, pos)
        if m is None:
            raise ConfigError(f"--set {item}: cannot read the key {key!r} at {key[pos:]!r} (write e.g. select[2].budget, "
                              "select.2.budget, select[-1].budget or select[+] to append)")
        text = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
        bracket = m.group(1) is not None
        if re.fullmatch(r"-?\d+", text):
            parts.append(int(text))
        elif text == APPEND:
            parts.append(APPEND)
        elif bracket:
            raise ConfigError(f"--set {item}: [{text}] is not a list index (a number, negative from the end, or + to append)")
        else:
            parts.append(text)
        pos = m.end()
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    return parts


def parse_value(raw: str) -> Any:
    """A ``--set`` value: YAML (``50``, ``0.5``, ``true``, ``[a, b]``, ``{method: top_k, budget: 5}``,
    ``"quoted text"``), except that text YAML would read as a block mapping or list (``hello: world``,
    ``- x``), as a comment (``run #3``) or as a date stays the text as written: only ``{…}`` and ``[…]``
    make mappings and lists. (``yes``/``no`` stay YAML's booleans.)"""
    text = raw.strip()
    if not text:
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, dict) and not text.startswith("{"):
        return text
    if isinstance(value, list) and not text.startswith("["):
        return text
    if value is None and text not in ("null", "Null", "NULL", "~"):
        return text
    if isinstance(value, str) and value != text and not (text[0] in "'\"" and text[-1] == text[0]):
        return text  # YAML dropped something (a trailing "# comment"): the text as written
    import datetime

    if isinstance(value, datetime.date):
        return text  # 2024-01-01 stays text (YAML would make a date no field takes)
    return value


def parse_override(item: str) -> tuple[list[str | int], Any]:
    """``select.0.budget=50`` -> (["select", 0, "budget"], 50); keys as errors print them
    (``select[0].budget``), negative indices (``select[-1]``) and ``[+]`` (append) are read too; the
    value as :func:`parse_value` reads it."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set select[0].budget=50")
    key, raw = item.split("=", 1)
    return _key_parts(key, item), parse_value(raw)


def _path_text(parts) -> str:
    return _fmt_loc(tuple(parts))


def apply_override(data: dict, parts: list[str | int], value: Any, item: str) -> tuple:
    """Set ``value`` at ``parts`` in ``data`` (creating mappings on the way); returns the path it set,
    with negative indices and ``+`` (append) turned into the item's index."""
    node: Any = data
    done: list[str | int] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        nxt = None if last else parts[i + 1]
        fresh = [] if isinstance(nxt, int) or nxt == APPEND else {}
        if isinstance(part, int) or part == APPEND:
            where = _path_text(done)
            if not isinstance(node, list):
                raise ConfigError(f"--set {item}: '{where}' is not a list, so [{part}] does not apply")
            if part == APPEND:
                node.append(value if last else fresh)
                part = len(node) - 1
            else:
                if not -len(node) <= part < len(node):
                    have = f"it has {len(node)} item{'s' if len(node) != 1 else ''}: 0 to {len(node) - 1}" if node else "it is empty"
                    raise ConfigError(f"--set {item}: no list item {part} at '{where}' ({have}; [+] appends one)")
                part = part % len(node)
                if last:
                    node[part] = value
                elif node[part] is None:
                    node[part] = fresh
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{_path_text(done)}' is not a mapping, so it has no key '{part}'")
            if last:
                node[part] = value
            elif part not in node or node[part] is None:
                node[part] = fresh
        done.append(part)
        if not last:
            node = node[part]
    return tuple(done)


def yaml_lines(text: str) -> dict[tuple, int]:
    """Map each field path in a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_UNION_TAGS = {"int", "float", "str", "bool", "none", "list", "dict"}


def _override_note(loc: tuple, overridden: dict[tuple, str] | None) -> str:
    """`` (from --set KEY=VALUE)`` when the value at ``loc`` came from ``--set``: set there, or inside an item
    (or value) that ``--set`` set as a whole (an override of ``inputs[0].limit`` says nothing about an
    error on ``inputs[0]`` as a whole)."""
    for path, item in (overridden or {}).items():
        if loc[:len(path)] == path:
            return f" (from --set {item})"
    return ""


def _where(source: str, lines: dict[tuple, int], loc: tuple, overridden: dict[tuple, str] | None = None) -> str:
    """``file:line`` of the field at ``loc`` (or of the nearest field above it in the file); just the file
    when ``--set`` made the field or an item above it (an appended step has no line)."""
    if any(path == loc[:len(path)] and path not in lines for path in overridden or {}):
        return source
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    return f"{source}:{line}" if line else source


def format_validation_error(exc: ValidationError, source: str, lines: dict[tuple, int], prefix: tuple = (),
                            overridden: dict[tuple, str] | None = None) -> str:
    """One line per field: ``file:line: path.to.field: message`` (union alternatives merged; `` (from --set …)``
    where an override gave the value)."""
    merged: dict[tuple, list[str]] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        while loc and isinstance(loc[-1], str) and (loc[-1] in _UNION_TAGS or "[" in loc[-1]):
            loc = loc[:-1]  # union member tags such as budget.int / budget.float
        loc = prefix + loc
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; docs/flows.md lists every key)"
        elif err["type"] == "string_pattern_mismatch":
            pattern = (err.get("ctx") or {}).get("pattern", "")
            msg = f"{err.get('input')!r} does not match the pattern {pattern}"
            if loc == ("name",):
                msg += f": lowercase letters, digits and dashes, starting with a letter or digit (e.g. name: {slug(str(err.get('input')))})"
        if msg not in merged.setdefault(loc, []):
            merged[loc].append(msg)
    out = []
    for loc, msgs in merged.items():
        out.append(f"{_where(source, lines, loc, overridden)}: {_fmt_loc(loc)}: {' / '.join(msgs)}{_override_note(loc, overridden)}")
    return "\n".join(out)


def load_flow(path: str | os.PathLike, overrides: list[str] | None = None, check_output: bool = True) -> FlowSpec:
    """Read, override and validate a flow YAML: its keys and values, each step's parameters, the scores
    its selection steps read, and (``check_output``; not for a flow that runs on another host) that its
    output folder can be made and written here. Raises ConfigError with file, line and field (and the
    ``--set`` item when an override gave the value)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such flow file")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a flow file")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a flow file must be a YAML mapping (name:, inputs:, …)")
    overridden: dict[tuple, str] = {}
    for item in overrides or []:
        parts, value = parse_override(item)
        overridden[apply_override(data, parts, value, item)] = item
    expand_presets(data, path)
    lines = yaml_lines(text)
    try:
        spec = FlowSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), lines, overridden=overridden)) from None
    spec.flow_path = str(path.resolve())
    _validate_steps(spec, str(path), lines, overridden)
    if check_output:
        check_output_dir(spec, str(path), lines, overridden)
    return spec


def check_output_dir(spec: FlowSpec, source: str | None = None, lines: dict[tuple, int] | None = None,
                     overridden: dict[tuple, str] | None = None) -> None:
    """The output folder can be made and written: it (or the nearest folder above it that exists) is a
    folder this process may write in, and nothing on the way is a file. Creates nothing."""
    out = spec.out
    where = _where(source or spec.flow_path or "flow", lines or {}, ("output_dir",), overridden)
    note = _override_note(("output_dir",), overridden)
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == out else f"cannot be made: {probe} is a file"
        raise ConfigError(f"{where}: output_dir: {out} {what}; set output_dir to a folder{note}")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == out else f"cannot be made: {probe} is not writable"
        raise ConfigError(f"{where}: output_dir: {out} {what} by this user; set output_dir to a folder you can write{note}")


def preset_dirs(data: dict, flow_path: Path) -> list[Path]:
    """Where ``select: <name>`` looks: the flow's own ``selectors/`` (under base_dir), the source
    checkout's, then the copy a wheel installs under ``<prefix>/share/curate/selectors``."""
    import sys

    base = (flow_path.parent / str(data.get("base_dir", "."))).resolve()
    return [base / "selectors", Path(__file__).resolve().parents[1] / "selectors", Path(sys.prefix) / "share" / "curate" / "selectors"]


def expand_presets(data: dict, flow_path: Path) -> None:
    """``select: <name>`` or a ``- preset: <name>`` item expands to the steps of
    ``selectors/<name>.yaml`` (looked up under base_dir, then beside the curate package); other keys
    of the item override that preset's steps' parameters where they have them."""
    sel = data.get("select")
    if sel is None:
        return
    items = [{"preset": sel}] if isinstance(sel, str) else sel
    if not isinstance(items, list):
        return
    out = []
    for item in items:
        if not (isinstance(item, dict) and "preset" in item):
            out.append(item)
            continue
        name = item["preset"]
        path = next((d / f"{name}.yaml" for d in preset_dirs(data, flow_path) if (d / f"{name}.yaml").exists()), None)
        if path is None:
            known = sorted({p.stem for d in preset_dirs(data, flow_path) if d.exists() for p in d.glob("*.yaml")})
            raise ConfigError(f"{flow_path}: select preset '{name}' not found (known: {', '.join(known) or 'none'})")
        preset = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        steps = preset.get("steps")
        if not isinstance(steps, list):
            raise ConfigError(f"{path}: a preset needs a 'steps:' list")
        extra = {k: v for k, v in item.items() if k != "preset"}
        for step in steps:
            step = dict(step)
            for k, v in extra.items():
                if k in step:
                    step[k] = v
            out.append(step)
    data["select"] = out


def _validate_steps(spec: FlowSpec, source: str, lines: dict[tuple, int], overridden: dict[tuple, str] | None = None) -> None:
    """Check each scorer/selector's parameters against its class (unknown methods, bad params), that
    steps needing embeddings have them, and that the scores a selection step names (its ``score`` and a
    ``token_budget``'s ``count``) are outputs of the flow's scorers (:func:`score_reference_errors`)."""
    from curate.rewrite import REWRITERS, rewriter_class
    from curate.scorers import SCORERS, scorer_class
    from curate.select import SELECTORS, selector_class

    errors = []
    params: dict[tuple, Any] = {}
    sections = [(("score",), spec.score, SCORERS, scorer_class), (("select",), spec.select, SELECTORS, selector_class)]
    if spec.rewrite is not None:
        sections += [(("rewrite", "steps"), spec.rewrite.steps, REWRITERS, rewriter_class),
                     (("rewrite", "select"), spec.rewrite.select, SELECTORS, selector_class)]
    for prefix, steps, registry, get in sections:
        section = ".".join(prefix)
        for i, step in enumerate(steps):
            loc = (*prefix, i)
            if step.method not in registry:
                known = sorted(registry)
                close = difflib.get_close_matches(step.method, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                at = loc + ("method",)
                errors.append(f"{_where(source, lines, at, overridden)}: {section}[{i}].method: unknown method '{step.method}' "
                              f"(known: {', '.join(known)}){hint}{_override_note(at, overridden)}")
                continue
            cls = get(step.method)
            try:
                params[loc] = cls.Params.model_validate(step.params)
            except ValidationError as exc:
                errors.append(format_validation_error(exc, source, lines, loc, overridden))
    if spec.embed is not None:
        from curate.embed import EMBEDDERS

        if spec.embed.method not in EMBEDDERS:
            errors.append(f"{_where(source, lines, ('embed', 'method'))}: embed.method: unknown embedder '{spec.embed.method}' "
                          f"(known: {', '.join(sorted(EMBEDDERS))})")
    for prefix, steps in _select_sections(spec):
        for i, step in enumerate(steps):
            loc = (*prefix, i)
            if loc in params and getattr(selector_class(step.method), "needs_embeddings", False) and spec.embed is None:
                errors.append(f"{_where(source, lines, loc + ('method',))}: {_fmt_loc(loc)} ({step.method}) needs embeddings: "
                              "add an 'embed:' section")
    errors += score_reference_errors(spec, source, lines, overridden, params, missing_scorers_in_count=False)
    if errors:
        raise ConfigError("\n".join(errors))


def _select_sections(spec: FlowSpec) -> list[tuple[tuple, list[StepSpec]]]:
    return [(("select",), spec.select)] + ([(("rewrite", "select"), spec.rewrite.select)] if spec.rewrite else [])


def flow_scores(spec: FlowSpec) -> dict[str, str]:
    """Every score the flow's scorers write: ``<scorer name>.<output>`` -> the scorer's method."""
    from curate.scorers import SCORERS, scorer_class

    return {f"{s.label}.{o}": s.method for s in spec.score if s.method in SCORERS for o in scorer_class(s.method).outputs}


def score_reference_errors(spec: FlowSpec, source: str | None = None, lines: dict[tuple, int] | None = None,
                           overridden: dict[tuple, str] | None = None, params: dict[tuple, Any] | None = None,
                           missing_scorers_in_count: bool = True) -> list[str]:
    """One message per score a selection step reads (``score``; ``token_budget``'s ``count``) that no
    scorer of the flow writes, with the closest name (difflib) when there is one.

    ``missing_scorers_in_count=False`` leaves out ``count`` entries whose scorer the flow lacks
    altogether (``curate compare`` adds its ``chat_tokens`` scorer after loading the flow): the run and
    ``curate plan`` check them (:func:`check_flow`) before ingest."""
    from curate.select import SELECTORS, selector_class

    source = source or spec.flow_path or "flow"
    lines = lines or {}
    available = flow_scores(spec)
    labels = {s.label for s in spec.score}
    from curate.scorers import SCORERS

    unknown = {s.label for s in spec.score if s.method not in SCORERS}
    names = sorted(available)
    errors = []

    def check(name: Any, loc: tuple, count: bool) -> None:
        if not isinstance(name, str) or name in available:
            return
        scorer = name.split(".", 1)[0]
        if scorer in unknown:  # its method is unknown: that error is already given
            return
        if count and not missing_scorers_in_count and scorer not in labels:
            return
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        if scorer in labels:
            outputs = [n.split(".", 1)[1] for n in names if n.split(".", 1)[0] == scorer]
            output = name.split(".", 1)[1] if "." in name else ""
            why = f"scorer '{scorer}' has no output '{output}' ({hint}its outputs: {', '.join(outputs)})"
        else:
            why = (f"'{name}' names no scorer of this flow ({hint}scores: {', '.join(names) or 'none — add a score: section'}; "
                   "write <scorer>.<output>)")
            if count and scorer == "heuristic":
                why += "; add '- method: heuristic' to the score: section"
        errors.append(f"{_where(source, lines, loc, overridden)}: {_fmt_loc(loc)}: {why}{_override_note(loc, overridden)}")

    for prefix, steps in _select_sections(spec):
        for i, step in enumerate(steps):
            loc = (*prefix, i)
            if step.method not in SELECTORS:
                continue
            p = (params or {}).get(loc)
            if p is None:
                try:
                    p = selector_class(step.method).Params.model_validate(step.params)
                except ValidationError:
                    continue
            check(getattr(p, "score", None), loc + ("score",), False)
            count = getattr(p, "count", None)
            if isinstance(count, list):
                for j, name in enumerate(count):
                    check(name, loc + ("count", j), True)
    return errors


def check_flow(spec: FlowSpec) -> None:
    """What a run and ``curate plan`` check before ingest, on the flow as it will run (after
    ``curate compare`` added its scorer): every score the selection steps read, and the output folder."""
    lines: dict[tuple, int] = {}
    if spec.flow_path and Path(spec.flow_path).is_file():
        lines = yaml_lines(Path(spec.flow_path).read_text(encoding="utf-8"))
    errors = score_reference_errors(spec, spec.flow_path, lines)
    if errors:
        raise ConfigError("\n".join(errors))
    check_output_dir(spec, spec.flow_path, lines)


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes (Prefect artifact keys)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"
