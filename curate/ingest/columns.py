"""The user's own input columns, carried beside the conversation (``inputs[i].keep_columns``).

A record keeps its whole input row as JSON in ``original``; the *extra* columns of a row are the
fields its reader did not map to the conversation (for an alpaca input everything but
``instruction``/``input``/``output``/``system``/``history``, through the input's ``fields:`` mapping),
or the names an input lists. They go, under one name each, into ``ledger.parquet`` (every input row)
and every export file (the selected rows), after the layout's own fields. Both the ledger stage
(:func:`keep_plan`, :func:`ledger_columns`) and the export stage (:func:`carried`) read them from here:

- the user's ``id`` becomes ``source_id`` (beside curate's ``sample_id`` / ``id``); a column whose name
  curate or a trainer already gives a meaning (:data:`RESERVED`: the layouts' fields, the ledger's
  columns, the keys TRL reads when present — ``text``/``label``/``chosen``/``rejected``, ``images``,
  ``input_ids``, ``labels`` … —, ``curate.*``/``score.*``) becomes ``source_<name>``: a trainer reads
  only the fields it is configured for and ignores the others, but a stray ``text``, ``labels`` or
  ``input_ids`` would change how TRL reads the file;
- a column is in every row of a file or in none (null where a row lacks it; derived rows have none);
- values keep their JSON types where one Arrow type holds every value of the column exactly (strings,
  numbers — ints and floats together become floats —, booleans, and dicts/lists of the same shape in
  every row); NaN/Infinity become null. Otherwise, in JSONL and Parquet alike, so that Parquet,
  ``datasets`` and the trainers read one type per column: a column of scalars of several types (an
  ``id`` that is a number in one file and a string in another) becomes strings — strings as they
  are, numbers and booleans as their JSON text (``2`` -> ``"2"``) —, listed in the manifest under
  ``columns.as_string``; a column with dicts or lists that no one type holds (different keys, mixed
  element types, a dict in one row and a string in another) has every value written as its JSON text
  (``json.loads`` gives it back), listed under ``columns.as_json``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa

from curate.records import canonical_json

#: the fields each input format maps to the conversation (canonical names, before ``fields:``)
CONVERSATION_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system", "tools"),
    "openai": ("messages", "tools"),
    "prompt_completion": ("prompt", "completion", "tools"),
}

#: names a carried column may not keep: the layouts' fields, the ledger's and the sidecar's columns,
#: the keys TRL 1.16's SFTTrainer reads when present (dataset type: text/prompt/completion/chosen/
#: rejected/label; vision: image/images; ``input_ids`` marks a tokenised dataset; ``labels`` is used as
#: is; ``chat_template_kwargs``), LLaMA-Factory's multimodal and KTO columns
RESERVED = frozenset({
    "id", "source_id", "messages", "prompt", "completion", "tools", "instruction", "input", "output", "system", "history",
    "conversations", "text", "chosen", "rejected", "label", "images", "image", "videos", "audios", "kto_tag",
    "labels", "input_ids", "attention_mask", "completion_mask", "assistant_masks", "seq_lengths", "position_ids",
    "token_type_ids", "chat_template_kwargs", "reasoning_content",
    "row", "sample_id", "source", "source_index", "source_line", "source_file", "outcome", "stage", "reason", "detail",
    "rank", "origin", "parents", "original", "selected",
})


def column_names(names: list[str]) -> dict[str, str]:
    """Input column -> the name it is written under: ``id`` -> ``source_id`` (always: it is named first),
    a reserved name -> ``source_<name>``, prefixed again until it clashes with nothing; whatever the
    order of ``names``."""
    others = set(names)
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in sorted(names, key=lambda n: n != "id"):
        if name == "id":
            new = "source_id"
        elif name in RESERVED or name.startswith(("curate.", "score.")):
            new = f"source_{name}"
        else:
            new = name
        is_ids = name == "id" and new == "source_id"
        while new in used or (new != name and new in others and not is_ids) or (new in RESERVED and not is_ids):
            new = f"source_{new}"
            is_ids = False
        out[name] = new
        used.add(new)
    return {n: out[n] for n in names}


def keep_plan(inputs: list, sources: list) -> dict[str, dict] | None:
    """Per input file label: what to keep (``keep``) and the input's ``fields`` mapping; None when no
    input keeps a column (then nothing changes anywhere). ``inputs``: the flow's InputSpecs;
    ``sources``: the run's IngestRefs (their files and input index)."""
    if all(spec.keep_columns == "none" for spec in inputs):
        return None
    plan: dict[str, dict] = {}
    for ref in sources:
        spec = inputs[ref.input_index]
        vector = spec.embedding.field if spec.embedding is not None else None
        for label in ref.files:
            plan.setdefault(label, {"keep": spec.keep_columns, "fields": dict(spec.fields), "vector": vector,
                                    "input": ref.input_index, "source": ref.source})
    return plan


def row_columns(original: str | None, fmt: str | None, how: dict | None) -> dict[str, Any]:
    """One row's kept columns (input names) from its ``original`` JSON."""
    if how is None or how["keep"] == "none" or not original:
        return {}
    try:
        row = json.loads(original)
    except ValueError:
        return {}
    if not isinstance(row, dict):
        return {}
    if isinstance(how["keep"], list):
        return {k: row.get(k) for k in how["keep"]}
    fields = how["fields"]
    used = {fields.get(k, k) for k in CONVERSATION_FIELDS.get(fmt or "", ())} | {how.get("vector")}
    return {k: v for k, v in row.items() if k not in used}


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    return "nested"


def _has_empty_struct(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.num_fields == 0 or any(_has_empty_struct(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_empty_struct(t.value_type)
    return False


def unify(values: list[Any]) -> tuple[list[Any], pa.DataType, str | None]:
    """One column's values as written, its Arrow type, and how they were changed: None (JSON values as
    they are), ``"string"`` (scalars of several types: strings as they are, numbers and booleans as their
    JSON text) or ``"json"`` (every value as its JSON text)."""
    vals = [_finite(v) for v in values]
    kinds = {_kind(v) for v in vals if v is not None}
    if kinds == {"int", "float"}:
        vals = [None if v is None else float(v) for v in vals]
        kinds = {"float"}
    if len(kinds) <= 1:
        try:
            arr = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError):
            arr = None
        if arr is not None and not _has_empty_struct(arr.type) and (
                kinds != {"nested"} or canonical_json(arr.to_pylist()) == canonical_json(vals)):
            return vals, arr.type, None
    if "nested" not in kinds:
        return [None if v is None else v if isinstance(v, str) else canonical_json(v) for v in vals], pa.string(), "string"
    return [None if v is None else canonical_json(v) for v in vals], pa.string(), "json"


def carried(records: list[dict], plan: dict[str, dict] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per record (same order), its carried columns under their written names, every row with every
    column; and a description for the manifest (``names``: input name -> written name, ``as_string``, ``as_json``,
    ``missing``: listed names no row has; ``types``: written name -> Arrow type, not for the manifest).
    Nothing (``[{}…]``, ``{}``) when ``plan`` is None."""
    if plan is None:
        return [{} for _ in records], {}
    return _columns([_own(r, plan) for r in records], plan)


def _own(record: dict, plan: dict[str, dict]) -> dict[str, Any]:
    how = plan.get(record.get("source_file")) if record.get("origin") in (None, "input") else None
    return row_columns(record.get("original"), record.get("format"), how)


def _columns(raw: list[dict[str, Any]], plan: dict[str, dict]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`carried` from each row's kept columns under their input names."""
    order: dict[str, None] = {}
    for how in plan.values():  # listed names first, in the order given; then the others as first seen
        if isinstance(how["keep"], list):
            order.update(dict.fromkeys(how["keep"]))
    for cols in raw:
        order.update(dict.fromkeys(cols))
    names = column_names(list(order))
    rows: list[dict[str, Any]] = [{} for _ in raw]
    listed = {n for how in plan.values() if isinstance(how["keep"], list) for n in how["keep"]}
    changed: dict[str, list[str]] = {"string": [], "json": []}
    missing, types = [], {}
    for name, new in names.items():
        values = [cols.get(name) for cols in raw]
        if name in listed and not any(cols.get(name) is not None for cols in raw):
            missing.append(name)
        vals, types[new], how = unify(values)
        if how:
            changed[how].append(new)
        for row, v in zip(rows, vals):
            row[new] = v
    return rows, {"names": names, "as_string": changed["string"], "as_json": changed["json"], "missing": missing, "types": types}


def ledger_columns(plan: dict[str, dict], sources: list, n_input: int) -> tuple[dict[str, pa.Array], dict[str, Any]]:
    """The carried columns of every input row, in row order (``row`` 0 … n_input - 1), for the ledger:
    from each row's record (duplicates included) or, for a quarantined row, from its raw text when that
    is a whole JSON object (it is cut at 10,000 characters)."""
    import pyarrow.parquet as pq

    from curate.ingest.formats import detect_format

    raw: list[dict[str, Any]] = [{} for _ in range(n_input)]  # each row's kept columns only (not its whole original)
    offset = 0
    for ref in sources:
        for c in ref.chunks:
            base = offset + c.row_offset
            t = pq.read_table(c.records_path, columns=["row", "format", "source_file", "original"])
            for row, fmt, label, original in zip(*(t.column(k).to_pylist() for k in ("row", "format", "source_file", "original"))):
                raw[base + row] = _own({"original": original, "format": fmt, "source_file": label, "origin": "input"}, plan)
            q = pq.read_table(c.quarantine_path, columns=["local_row", "raw"])
            how = plan.get(c.file) or {"fields": {}}
            for local, text in zip(q.column("local_row").to_pylist(), q.column("raw").to_pylist()):
                try:
                    value = json.loads(text) if text else None
                except ValueError:
                    value = None
                fmt = detect_format(value, how["fields"]) if isinstance(value, dict) else None
                raw[base + local] = _own({"original": text if isinstance(value, dict) else None, "format": fmt, "source_file": c.file,
                                          "origin": "input"}, plan)
        offset += ref.n_rows
    rows, info = _columns(raw, plan)
    types = info.get("types", {})
    return {name: pa.array([r[name] for r in rows], typ) for name, typ in types.items()}, info
