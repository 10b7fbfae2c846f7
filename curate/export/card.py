"""The export's dataset card: ``<export>/README.md`` with the Hugging Face Hub's YAML header.

Header (the Hub's dataset card metadata, ``huggingface_hub.DatasetCardData`` fields)::

    license          the inputs' ``license:`` values (one, or a list); ``unknown`` for inputs that state none
    language         the lang scorer's languages when every selected row is in them; else not set
    size_categories  the Hub's bucket of the selected row count (n<1K, 1K<n<10K, …)
    task_categories  [text-generation]
    pretty_name, tags
    configs          one config per layout (the Parquet file when it has rows, else the JSONL file), the
                     ``messages`` one ``default: true``: ``datasets.load_dataset(<export dir>)`` and the
                     Hub's viewer read these files and nothing else (not the sidecars beside them); each
                     config's ``description`` (a BuilderConfig field) holds its file's sha256, because
                     ``datasets`` caches a local folder under its name and a hash of the card's configs
                     alone — without it a second export in a folder also named ``export`` loaded the
                     first one's cached rows

Body: the flow (name, description, steps and their parameters), the counts (input, per outcome and
per reason), the sources with their row counts and licences, how it was made (curate version, config
hash, store keys) and how to load it. The text depends only on the run's data and config (no time),
like every other export file.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import yaml

from curate.version import __version__

#: the Hub's size buckets (upper bound exclusive, label)
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T")]


def size_category(n: int) -> str:
    return next((label for bound, label in SIZE_CATEGORIES if n < bound), "n>1T")


def _licenses(flow, sources: list) -> tuple[str | list[str], str | None]:
    """(the header's license value, a note for the body or None)."""
    stated, unstated = [], []
    for i, spec in enumerate(flow.inputs):
        name = next((r.source for r in sources if r.input_index == i), spec.name or spec.path or spec.hub)
        (stated if spec.license else unstated).append((name, spec.license))
    values = sorted({lic for _, lic in stated})
    note = None
    if unstated:
        values.append("unknown")
        names = ", ".join(f"`{n}`" for n, _ in unstated)
        note = (f"No licence is stated for {names}: the header says `unknown`. Check the licences of the sources and set "
                "`license:` on each input of the flow (a Hub licence id such as `apache-2.0`, `cc-by-4.0`, `mit` or `other`).")
    return (values[0] if len(values) == 1 else values), note


def _language(flow, sel: pa.Table) -> tuple[list[str] | None, str | None]:
    """The lang scorer's languages when every selected row is flagged as in them."""
    for step in flow.score:
        if step.method != "lang":
            continue
        from curate.scorers import scorer_class

        langs = list(scorer_class("lang").Params.model_validate(step.params).languages)  # validated: lower case, the default
        col = f"{step.label}.lang"
        if col not in sel.column_names or not sel.num_rows:
            return None, None
        flags = sel.column(col).to_pylist()
        inside = sum(1 for f in flags if f == 1)
        if inside == len(flags):
            return langs, None
        return None, (f"`language` is not set: {len(flags) - inside} of {len(flags)} selected rows are not detected as "
                      f"{', '.join(langs)} by the `{step.label}` scorer.")
    return None, None


def _configs(files: list[dict]) -> list[dict[str, Any]]:
    by = {(f["layout"], f["file_type"]): f for f in files}
    layouts = list(dict.fromkeys(f["layout"] for f in files))
    configs = []
    for layout in layouts:
        pq_file, jl_file = by.get((layout, "parquet")), by.get((layout, "jsonl"))
        f = pq_file if pq_file is not None and pq_file["n_rows"] else (jl_file or pq_file)
        # the file's hash in the config: `datasets` keys its cache of a local folder on the card's configs, not on
        # the files, so two exports in folders of the same name would otherwise load each other's cached rows
        entry: dict[str, Any] = {"config_name": layout, "data_files": [{"split": "train", "path": f["path"]}],
                                 "description": f"curate {layout} layout, {f['n_rows']} rows, sha256 {f['sha256']}"}
        configs.append(entry)
    if configs:
        first = next((c for c in configs if c["config_name"] == "messages"), configs[0])
        first["default"] = True
    return configs


def _params(step) -> str:
    p = step.params
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False, sort_keys=True)}" for k, v in p.items()) if p else "defaults"


def _reasons(ledger_path: str) -> list[tuple[str, str, int]]:
    import polars as pl

    t = (pl.scan_parquet(ledger_path).group_by("outcome", "reason").len(name="n")
         .sort(["outcome", "n", "reason"], descending=[False, True, False]).collect())
    return [(o, r or "", int(n)) for o, r, n in t.iter_rows()]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def dataset_card(flow, spec, files: list[dict], manifest: dict, sel: pa.Table, records: list[dict], sources: list,
                 ledger_path: str) -> str:
    """The card's text (YAML header, then Markdown)."""
    n = manifest["n_selected"]
    license_value, license_note = _licenses(flow, sources)
    language, language_note = _language(flow, sel)
    header: dict[str, Any] = {"license": license_value}
    if language:
        header["language"] = language
    header.update({"size_categories": [size_category(n)], "task_categories": ["text-generation"], "pretty_name": flow.name,
                   "tags": ["curate", "instruction-tuning", "sft"], "configs": _configs(files)})
    counts = manifest["counts"]
    n_input = sum(counts.values())
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", "",
             f"# {flow.name}", ""]
    if flow.description:
        lines += [flow.description, ""]
    lines += [f"{n} instruction rows selected by curate from {n_input} input rows, for supervised fine-tuning "
              "(LLaMA-Factory, axolotl, TRL). Written by curate with the export; every count below is the run's own "
              "(`manifest.json`, `run.json`).", ""]
    if not n:
        lines += ["**No row was selected**: the files are empty (the report says where the rows ran out), and "
                  "`datasets` builds no dataset from them.", ""]
    if license_note:
        lines += [f"**Licence.** {license_note}", ""]
    if language_note:
        lines += [f"**Language.** {language_note}", ""]

    lines += ["## Sources", "", "| source | files | rows read | valid | quarantined | selected | licence |",
              "|---|---|---|---|---|---|---|"]
    input_of = {label: r.input_index for r in sources for label in r.files}
    picked: dict[int, int] = {}
    for rec in records:
        i = input_of.get(rec.get("source_file"))
        if i is not None and rec.get("origin") in (None, "input"):
            picked[i] = picked.get(i, 0) + 1
    for r in sources:
        lic = flow.inputs[r.input_index].license or "not stated"
        lines.append(f"| {_cell(r.source)} | {_cell(', '.join(r.files))} | {r.n_rows} | {r.n_valid} | {r.n_quarantined} | "
                     f"{picked.get(r.input_index, 0)} | {_cell(lic)} |")
    derived = n - sum(picked.values())
    if derived > 0:
        lines += ["", f"{derived} selected rows were made by the flow's rewrite stage "
                  "(`curate.origin` / `lineage.parquet` name their parents)."]

    lines += ["", "## Counts", "", f"- input rows: {n_input}"]
    lines += [f"- {o.replace('_', ' ')}: {counts.get(o, 0)}" for o in ("selected", "not_selected", "filtered", "quarantined")]
    if manifest.get("derived_counts"):
        lines.append(f"- derived rows: {sum(manifest['derived_counts'].values())} "
                     f"({', '.join(f'{k.replace(chr(95), chr(32))} {v}' for k, v in manifest['derived_counts'].items())})")
    lines += ["", "Per outcome and reason (`ledger.parquet` has every input row with its reason and detail):", "",
              "| outcome | reason | rows |", "|---|---|---|"]
    lines += [f"| {o} | {_cell(r) or '–'} | {c} |" for o, r, c in _reasons(ledger_path)]

    lines += ["", "## How it was selected", "", f"Flow `{flow.name}`, seed {flow.seed}.", ""]
    if flow.score:
        lines += ["Scorers:", ""] + [f"- `{s.label}`: {s.method} ({_params(s)})" for s in flow.score] + [""]
    if flow.embed is not None:
        lines += [f"Embeddings: {flow.embed.method} `{flow.embed.model}` over the {flow.embed.text}.", ""]
    if flow.select:
        lines += ["Selection steps, in order:", ""] + [f"{i + 1}. `{s.label}` ({_params(s)})" for i, s in enumerate(flow.select)] + [""]
    else:
        lines += ["No selection step: every valid row is kept.", ""]
    if flow.rewrite is not None:
        lines += [f"Rewrite (pool `{flow.rewrite.pool}`): " + "; ".join(f"`{s.label}` ({_params(s)})" for s in flow.rewrite.steps), ""]
        if flow.rewrite.select:
            lines += ["Then selected again: " + "; ".join(f"`{s.label}` ({_params(s)})" for s in flow.rewrite.select), ""]
    keys = manifest.get("keys") or {}
    lines += ["## How it was made", "", f"- curate {__version__}", f"- config hash `{keys.get('config_hash', '')}`"]
    lines += [f"- `{k}` store key `{v}`" for k, v in keys.items() if k != "config_hash"]
    lines += ["- the same flow and seed give byte-identical files; `manifest.json` has each file's sha256", ""]

    lines += ["## Files", "", "| file | layout | rows |", "|---|---|---|"]
    lines += [f"| `{f['path']}` | {f['layout']} | {f['n_rows']} |" for f in files]
    lines += ["", "Beside them: `scores.parquet` (every score of the selected rows, joinable on `id`), `ledger.parquet` (every input "
              "row's outcome), `dataset_info.json` (LLaMA-Factory), `axolotl_datasets.yaml`, `trl_load.py`, `manifest.json`.", ""]
    if spec.extra_columns:
        lines += ["Training files also carry `curate.*` (source, rank) and `score.*` columns; the trainers read only the columns "
                  "their configs name.", ""]
    if any(f.get("columns") for f in files):
        names = next(f["columns"] for f in files if f.get("columns"))
        carried = ", ".join(f"`{v}`" + (f" (input `{k}`)" if k != v else "") for k, v in names["names"].items())
        as_string, as_json = (", ".join(f"`{c}`" for c in names[k]) for k in ("as_string", "as_json"))
        lines += [f"The inputs' own columns are carried in every file: {carried or 'none'}"
                  + (f"; as strings (values of several types): {as_string}" if as_string else "")
                  + (f"; as JSON text: {as_json}" if as_json else "") + ".", ""]

    default = next((c for c in header["configs"] if c.get("default")), None)
    lines += ["## Load it", "", "```python", "from datasets import load_dataset", "",
              f"ds = load_dataset(\"path/to/this/folder\", split=\"train\")  # the {default['config_name'] if default else ''} files"]
    lines += [f"ds = load_dataset(\"path/to/this/folder\", \"{c['config_name']}\", split=\"train\")"
              for c in header["configs"] if not c.get("default")]
    lines += ["```", "",
              "- LLaMA-Factory: `dataset_dir: <this folder>` and `dataset:` one of the names in `dataset_info.json`.",
              "- axolotl: the `datasets:` block of `axolotl_datasets.yaml` (paths relative to this folder).",
              "- TRL: `python trl_load.py MODEL` (or `trainer(model_id)` from it).",
              f"- Sequence length the export was made for: {spec.max_length} tokens (`max_length`).", ""]
    return "\n".join(lines)
