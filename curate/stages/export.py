"""Export: the selected rows in each trainer layout, plus trainer configs and a manifest.

Layout of ``<output_dir>/export/`` (one file type per folder, as LLaMA-Factory requires)::

    messages/curated_messages.jsonl           messages_parquet/curated_messages.parquet
    alpaca/curated_alpaca.jsonl               sharegpt/curated_sharegpt.jsonl   …
    dataset_info.json        LLaMA-Factory entries (dataset_dir = this folder)
    axolotl_datasets.yaml    axolotl datasets: block + sequence_len
    trl_load.py              TRL loading snippet
    scores.parquet           sidecar: id, provenance, every score, rank, original record
    ledger.parquet           every input row's outcome
    derived_ledger.parquet   every derived row's outcome (flows with a rewrite stage)
    lineage.parquet          derived rows → parents, with what made them (flows with a rewrite stage)
    manifest.json            files, row counts, sha256, keys, max_length, validation report
    README.md                the dataset card: Hub YAML header + the flow, counts, sources (curate.export.card)

With ``keep_columns`` on an input, its own columns follow the layout's fields in every file (and the
ledger holds them for every input row): :mod:`curate.ingest.columns`.

Rows are written in input order with a rank column (methods.md B0). The bytes depend only on the
data and the config (no timestamps), so the same config and seed give byte-identical exports.

The export is put in place as a whole: every file is written into the sibling folder
``.<dir>.partial`` (layouts by their tasks, then sidecars, configs and the manifest last), and the
finished folder then replaces ``<dir>`` (:func:`curate.io.swap_dir`). Until then the previous export
stays as it was. A layout that fails (a full disk raises :class:`curate.io.DiskFull`) removes its own
files, and the partial folder when nothing else is in it; a failed finalize removes the partial
folder. Whatever a kill or another layout's failure leaves there is cleared by the next export.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import ExportSpec
from curate.export.card import dataset_card
from curate.export.layouts import check_rules, convert_rows
from curate.export.trainers import axolotl_yaml, dataset_info, trl_snippet
from curate.ingest.columns import carried
from curate.io import atomic_path, file_sha256, swap_dir, write_json, write_parquet, write_text
from curate.manifests import ExportRef, LedgerRef, SelectionRef
from curate.pipeline.stage import Run, Stage
from curate.recordset import read_records
from curate.version import __version__

META_COLUMNS = {"sample_id", "row", "source", "source_index", "source_line", "task", "selected", "rank"}


def selected_records(selection: SelectionRef) -> tuple[list[dict], pa.Table]:
    """The selected canonical records in row order (read from the selection's own record set, never
    from every shard of the input), and their rows of the round's wide score table in the same order."""
    table = read_records(selection.selected)
    scores = pq.read_table(selection.path)
    sel = scores.filter(pc.equal(scores.column("selected"), True))
    if not sel.num_rows:  # an empty selection: nothing to order (its id column may even be untyped)
        return table.to_pylist(), sel
    position = pc.index_in(sel.column("sample_id"), value_set=table.column("sample_id"))
    sel = sel.take(pc.sort_indices(position))
    return table.to_pylist(), sel


def staging_dir(export_dir: Path) -> Path:
    """Where an export is assembled before it replaces ``export_dir`` (a hidden sibling folder)."""
    return export_dir.with_name(f".{export_dir.name}.partial")


def _clean(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def _extras(sel: pa.Table, records: list[dict]) -> dict[str, dict[str, Any]]:
    """Per selected row: provenance, rank and every score; derived rows (when any) add origin and parents."""
    cols = sel.to_pydict()
    score_cols = [c for c in sel.column_names if c not in META_COLUMNS and not c.endswith(".status")]
    lineage = {r["sample_id"]: r for r in records} if any(r["origin"] not in (None, "input") for r in records) else None
    out = {}
    for i, sid in enumerate(cols["sample_id"]):
        extra = {"curate.source": cols["source"][i], "curate.source_index": cols["source_index"][i], "curate.rank": cols["rank"][i]}
        if lineage is not None:
            extra["curate.origin"] = lineage[sid]["origin"]
            extra["curate.parents"] = lineage[sid]["parents"] or []
        for c in score_cols:
            extra[f"score.{c}"] = _clean(cols[c][i])
        out[sid] = extra
    return out


_MESSAGE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
#: each layout's columns (after ``id``) as an empty Parquet file declares them; a file with rows infers
#: its own (optional columns such as ``system``/``tools`` appear only where some row has one)
LAYOUT_SCHEMAS = {
    "messages": [("messages", _MESSAGE)],
    "prompt_completion": [("prompt", _MESSAGE), ("completion", _MESSAGE)],
    "alpaca": [("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())],
    "sharegpt": [("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))],
}


def empty_layout_table(layout: str, sel: pa.Table, extra_columns: bool) -> pa.Table:
    """A zero-row table for an empty selection: ``id``, the layout's columns and (``extra_columns``)
    the provenance and score columns a file with rows would carry, so that a trainer reading it finds
    the columns its config names."""
    fields = [("id", pa.string()), *LAYOUT_SCHEMAS[layout]]
    if extra_columns:
        fields += [("curate.source", pa.string()), ("curate.source_index", pa.int64()), ("curate.rank", pa.int64())]
        fields += [(f"score.{c}", pa.float64() if pa.types.is_null(sel.schema.field(c).type) else sel.schema.field(c).type)
                   for c in sel.column_names if c not in META_COLUMNS and not c.endswith(".status")]
    return pa.schema(fields).empty_table()


def folder(layout: str, file_type: str) -> str:
    return layout if file_type == "jsonl" else f"{layout}_{file_type}"


def export_layout(selection: SelectionRef, spec: ExportSpec, layout: str, out_dir: str, keep: dict | None = None) -> list[dict]:
    """Write one layout in every configured file type; returns file infos for the manifest. ``keep``
    (:func:`curate.ingest.columns.keep_plan`): the inputs' own columns to add after the layout's fields."""
    export_dir = Path(out_dir) / spec.dir
    records, sel = selected_records(selection)
    rows, skipped = convert_rows(records, layout)
    columns: dict[str, Any] = {}
    if keep is not None:  # decided over every selected row, so that every layout writes the same columns and types
        own, columns = carried(records, keep)
        by_id = {r["sample_id"]: c for r, c in zip(records, own)}
        rows = [{**r, **by_id[r["id"]]} for r in rows]
    if spec.extra_columns:
        extras = _extras(sel, records)
        rows = [{**r, **extras[r["id"]]} for r in rows]
    broken = [(r["id"], why) for r in rows if (why := check_rules(r, layout))]
    if broken:
        raise RuntimeError(f"export {layout}: {len(broken)} rows break the trainer rules, first {broken[0]}")
    stage = staging_dir(export_dir)
    for file_type in spec.file_types:  # this layout's folders only: the other layouts' tasks may be writing theirs
        shutil.rmtree(stage / folder(layout, file_type), ignore_errors=True)
    infos = []
    try:
        for file_type in spec.file_types:
            rel = f"{folder(layout, file_type)}/{spec.name}_{layout}.{file_type}"
            path = stage / rel
            if file_type == "jsonl":
                with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
                    for r in rows:
                        f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
            else:
                write_parquet(path, _parquet_table(rows, columns) if rows else empty_layout_table(layout, sel, spec.extra_columns))
            infos.append({"layout": layout, "file_type": file_type, "path": rel, "n_rows": len(rows), "sha256": file_sha256(path),
                          "skipped": [{"id": sid, "why": why} for sid, why in skipped],
                          "has": sorted({k for r in rows[:1] for k in r}),
                          **({"columns": {k: v for k, v in columns.items() if k != "types"}} if columns else {})})
    except BaseException:
        for file_type in spec.file_types:
            shutil.rmtree(stage / folder(layout, file_type), ignore_errors=True)
        with contextlib.suppress(OSError):  # only when empty: other layouts' tasks may still be writing theirs
            stage.rmdir()
        raise
    return infos


def _parquet_table(rows: list[dict], columns: dict[str, Any]) -> pa.Table:
    """The rows as an Arrow table; the carried columns get the type decided over every selected row
    (a column null in every row of this layout's rows stays typed)."""
    if not columns:
        return pa.Table.from_pylist(rows)
    types = columns["types"]
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in types} for r in rows])
    at = len([k for k in rows[0] if k not in types and not k.startswith(("curate.", "score."))])
    for i, (name, typ) in enumerate(types.items()):
        table = table.add_column(at + i, pa.field(name, typ), pa.array([r[name] for r in rows], typ))
    return table


def _copy(src: str, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _prune(stage: Path, keep: set[str]) -> None:
    """Remove from the partial folder whatever this export did not write (left by an export a kill
    cut short, perhaps with other layouts)."""
    for path in sorted(stage.rglob("*"), reverse=True):  # children before their folders
        rel = path.relative_to(stage).as_posix()
        if path.is_dir():
            if not any(k.startswith(rel + "/") for k in keep):
                shutil.rmtree(path)
        elif rel not in keep:
            path.unlink()


def export_finalize(selection: SelectionRef, ledger: LedgerRef, spec: ExportSpec, files: list[dict], out_dir: str,
                    keys: dict[str, Any], derived: bool | None = None, flow: Any = None, sources: list | None = None) -> ExportRef:
    """Sidecar, ledgers, trainer configs, the dataset card and the manifest, after every layout is
    written. ``derived``: the flow has a rewrite stage, so the derived ledger and lineage are exported
    even when it made no row (None: only when the ledger holds derived rows). ``flow`` (the FlowSpec)
    and ``sources`` (the run's IngestRefs): what the dataset card ``README.md`` describes (no card
    without ``flow``)."""
    export_dir = Path(out_dir) / spec.dir
    stage = staging_dir(export_dir)
    missing = [f["path"] for f in files if not (stage / f["path"]).is_file()]
    if missing:
        raise RuntimeError(f"export: {stage} lacks {missing}, which this export's layout tasks wrote (was it removed meanwhile?)")
    try:
        manifest = _finalize(selection, ledger, spec, files, stage, keys, derived, flow, sources)
        _prune(stage, {f["path"] for f in files} | set(manifest["sidecars"].values())
               | {"dataset_info.json", "axolotl_datasets.yaml", "trl_load.py", "manifest.json"})  # sidecars: README.md too
        swap_dir(stage, export_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportRef(dir=str(export_dir), files=[{k: v for k, v in f.items() if k != "has"} for f in files],
                     manifest_path=str(export_dir / "manifest.json"))


def _finalize(selection: SelectionRef, ledger: LedgerRef, spec: ExportSpec, files: list[dict], export_dir: Path,
              keys: dict[str, Any], derived: bool | None = None, flow: Any = None, sources: list | None = None) -> dict[str, Any]:
    """Write the sidecars, trainer configs and (last) the manifest into ``export_dir``; returns the manifest."""
    records, sel = selected_records(selection)
    sidecar = sel.rename_columns(["id" if c == "sample_id" else c for c in sel.column_names])
    sidecar = sidecar.append_column("original", pa.array([r["original"] for r in records], pa.string()))
    derived = ledger.n_derived > 0 if derived is None else derived
    if derived:
        sidecar = sidecar.append_column("origin", pa.array([r["origin"] for r in records], pa.string()))
        sidecar = sidecar.append_column("parents", pa.array([r["parents"] or [] for r in records], pa.list_(pa.string())))
    write_parquet(export_dir / "scores.parquet", sidecar)
    _copy(ledger.path, export_dir / "ledger.parquet")
    sidecars = {"scores": "scores.parquet", "ledger": "ledger.parquet"}
    if derived:
        _copy(ledger.derived_path, export_dir / "derived_ledger.parquet")
        _copy(ledger.lineage_path, export_dir / "lineage.parquet")
        sidecars.update(derived_ledger="derived_ledger.parquet", lineage="lineage.parquet")

    info = dataset_info(files, spec.name)
    write_json(export_dir / "dataset_info.json", info)
    write_text(export_dir / "axolotl_datasets.yaml", axolotl_yaml(files, spec.max_length))
    write_text(export_dir / "trl_load.py", trl_snippet(files, spec.max_length))

    token_cols = [c for c in sel.column_names if c.endswith(".prompt_tokens") or c.endswith(".response_tokens")]
    tokens = None
    if token_cols:
        scorer = token_cols[0].split(".")[0]
        p = sel.column(f"{scorer}.prompt_tokens").to_pylist()
        r = sel.column(f"{scorer}.response_tokens").to_pylist()
        total = sorted(int(a + b) for a, b in zip(p, r) if a == a and b == b)
        if total:
            tokens = {"tokenizer": "heuristic scorer's tokenizer (approximate; not the training template)",
                      "max": total[-1], "p50": total[len(total) // 2], "p95": total[min(len(total) - 1, int(len(total) * 0.95))],
                      "over_max_length": sum(t > spec.max_length for t in total)}
    manifest = {
        "curate_version": __version__,
        "n_selected": selection.n_selected,
        "counts": ledger.counts,
        **({"derived_counts": ledger.derived_counts} if derived else {}),
        "files": [{k: v for k, v in f.items() if k != "has"} for f in files],
        "sidecars": sidecars,
        "max_length": spec.max_length,
        "tokens": tokens,
        "keys": keys,
        "validation": {"rules": "system first; user/assistant alternation; ends on assistant; no empty turns; unique ids",
                       "broken_rows": 0, "unique_ids": len({r['sample_id'] for r in records}) == len(records)},
    }
    if flow is not None:  # the Hub's dataset card: YAML header (licence, size, configs) and what made the subset
        write_text(export_dir / "README.md", dataset_card(flow, spec, files, manifest, sel, records, sources or [], ledger.path))
        manifest["sidecars"]["card"] = "README.md"
    write_json(export_dir / "manifest.json", manifest)
    return manifest


# -- the stage ---------------------------------------------------------------------------------------


class ExportStage(Stage):
    """Write the final selection in every layout (a task each), then the trainer configs and manifest.
    Reads the last selection round, the ledger and ``input`` (the sources the card describes)."""

    kind = "export"

    def __init__(self, selection: str, derived: bool):
        super().__init__("export", reads=(selection, "ledger", "input"), writes=("export",))
        self.selection = selection
        self.derived = derived  # the flow has a rewrite stage: the derived ledger and lineage are exported

    def run(self, run: Run) -> dict[str, Any]:
        from curate.ingest.columns import keep_plan

        spec = run.spec
        selection = run.read(self, self.selection)
        ledger = run.read(self, "ledger")
        dataset = run.read(self, "input")
        keys = run.keys()
        keep = keep_plan(spec.inputs, dataset.sources)
        files, secs = run.map(self, export_layout, [dict(selection=selection, spec=spec.export, layout=layout, out_dir=str(run.out),
                                                         **({"keep": keep} if keep is not None else {}))
                                                    for layout in spec.export.layouts], task="export-{layout}")
        files = [f for group in files for f in group]
        (export,), secs2 = run.map(self, export_finalize, [dict(selection=selection, ledger=ledger, spec=spec.export, files=files,
                                                                out_dir=str(run.out), keys=keys, derived=self.derived,
                                                                flow=spec, sources=dataset.sources)],
                                   task="export-configs")
        run.write(self, "export", export)
        return {"stage": "export", "tasks": len(spec.export.layouts) + 1, "rows": selection.n_selected, "seconds": secs + secs2}

    def estimate(self, plan) -> dict[str, Any]:
        spec = plan.spec
        return {**self.describe(), "what": ", ".join(f"{lay}/{t}" for lay in spec.export.layouts for t in spec.export.file_types)}
