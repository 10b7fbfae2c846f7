"""axolotl load check for a curate export (run with the interpreter of a venv that has axolotl).

Builds a minimal axolotl config from the export's ``axolotl_datasets.yaml`` (the generated
``datasets:`` block; separately the commented "Alternative" sharegpt block; and the generated block
pointed at the messages Parquet file, which the export does not write into the YAML), with
``base_model`` = a local model dir and ``sequence_len`` / ``excess_length_strategy`` as written by the
export, runs axolotl's own ``axolotl preprocess`` CLI on it, loads the prepared dataset that
preprocess saved, and checks
  * prepared rows == the manifest's ``n_rows`` for the file (nothing dropped: long, short, empty);
  * labels mask the prompt: first label ignored, every row trains some tokens, the last trained
    span decodes to the exported final answer, and the first user text is in the masked part;
  * every assistant-side turn (assistant, gpt, function_call) is one trained span, and the rendered
    text has only system/user/assistant/tool role headers (no turn kept under a foreign role name).
The config sets ``shuffle_merged_datasets: false`` only so rows can be compared one to one.

    python ax_check.py EXPORT_DIR MODEL_DIR --work DIR [--json OUT.json]

Exit status 0 when every variant passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from common import CHAT_ROLES, ROLE_HEADER, LabelChecks, finish, rows_of  # noqa: E402
DROP_LOG = re.compile(r"Dropped \d+[^\n]*")


def variants(export_dir: Path) -> list[tuple[str, dict, list[dict]]]:
    """(name, top-level keys, datasets) for the generated block and the commented alternative."""
    text = (export_dir / "axolotl_datasets.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    top = {k: v for k, v in doc.items() if k != "datasets"}
    out = [("generated_block", top, doc["datasets"])]
    alt = text.split("# Alternative", 1)
    if len(alt) == 2:
        body = "\n".join(line[1:] for line in alt[1].splitlines()[1:] if line.startswith("#"))
        out.append(("sharegpt_alternative", top, yaml.safe_load(body)))
    # not written by the export: the generated block pointed at the Parquet copy of the messages file,
    # the way round datasets' 10 MB JSON blocks (a first block whose tools are all null cannot take strings)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    parquet = [f["path"] for f in manifest["files"] if f["layout"] == "messages" and f["file_type"] == "parquet"]
    if parquet and doc["datasets"]:
        out.append(("messages_parquet", top, [{**doc["datasets"][0], "path": parquet[0], "ds_type": "parquet"}]))
    return out


def run_variant(name: str, top: dict, datasets: list[dict], export_dir: Path, model_dir: str, work: Path, n_rows: dict) -> dict:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    vdir = work / name
    prepared = vdir / "prepared"
    dsets = [{**d, "path": str(export_dir / d["path"])} for d in datasets]
    cfg = {"base_model": model_dir, **top, "datasets": dsets, "dataset_prepared_path": str(prepared), "val_set_size": 0,
           "output_dir": str(vdir / "out"), "micro_batch_size": 1, "gradient_accumulation_steps": 1, "num_epochs": 1,
           "learning_rate": 1e-5, "optimizer": "adamw_torch", "sample_packing": False, "bf16": False, "fp16": False,
           "tf32": False, "dataset_num_proc": 1, "save_strategy": "no",
           # keep file order so prepared rows can be compared with exported rows one to one
           "shuffle_merged_datasets": False, "shuffle_before_merging_datasets": False}
    vdir.mkdir(parents=True, exist_ok=True)
    cfg_path = vdir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "WANDB_MODE": "disabled",
           "HF_DATASETS_CACHE": str(vdir / "hf_cache")}
    axolotl = Path(sys.executable).with_name("axolotl")
    proc = subprocess.run([str(axolotl), "preprocess", str(cfg_path)], capture_output=True, text=True, env=env, cwd=vdir, timeout=1200)
    log = proc.stdout + proc.stderr
    (vdir / "preprocess.log").write_text(log)
    expected = sum(n_rows[d["path"]] for d in datasets)
    result = {"variant": name, "files": [d["path"] for d in datasets], "type": [d.get("type") for d in datasets],
              "sequence_len": top.get("sequence_len"), "excess_length_strategy": top.get("excess_length_strategy"),
              "exported": expected, "prepared": None, "ok": False, "problems": [], "log": str(vdir / "preprocess.log")}
    if proc.returncode != 0:
        tail = [line for line in log.splitlines() if line.strip()][-6:]
        result["problems"].append(f"axolotl preprocess exited {proc.returncode}: " + " | ".join(tail)[-1500:])
        return result
    saved = [p.parent for p in prepared.rglob("dataset_info.json")] + [p.parent for p in prepared.rglob("dataset_dict.json")]
    if not saved:
        result["problems"].append(f"no prepared dataset under {prepared}")
        return result
    ds = load_from_disk(str(saved[0]))
    if hasattr(ds, "keys"):
        ds = ds["train"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    result["prepared"] = len(ds)
    drops = DROP_LOG.findall(log)
    rows = [r for d in datasets for r in rows_of(export_dir / d["path"])]
    problems = result["problems"]
    if len(ds) != expected:
        problems.append(f"{len(ds)} prepared rows, {expected} exported")
    if drops:
        problems.append("axolotl log: " + "; ".join(drops)[:500])
    roles_ok = 0
    checks = LabelChecks(tok, int(top.get("sequence_len") or 512))
    aligned = len(ds) == len(rows)
    for i, (row, ex) in enumerate(zip(rows, ds) if aligned else ()):
        labels, ids = list(ex["labels"]), list(ex["input_ids"])
        checks.row(i, row, ids, labels)
        text = tok.decode(ids, skip_special_tokens=False)
        if set(ROLE_HEADER.findall(text)) <= CHAT_ROLES:
            roles_ok += 1
        else:
            checks._bad(f"row {i}: role headers {sorted(set(ROLE_HEADER.findall(text)) - CHAT_ROLES)} are not chat roles")
    n = len(ds) if aligned else 0
    if roles_ok != n:
        problems.append(f"{n - roles_ok} rows rendered with non-chat role headers; {checks.first_bad}")
    problems.extend(checks.problems(n))
    result.update(prompt_masked=checks.masked, answer_is_label=checks.answer_ok, all_turns_trained=checks.turns_ok, chat_roles_only=roles_ok,
                  user_masked=checks.user_masked, truncated_at_sequence_len=checks.truncated,
                  example_tokens=len(ds[0]["input_ids"]) if len(ds) else 0, ok=not problems)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("model_dir")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    export_dir = a.export_dir.resolve()
    manifest = json.loads((export_dir / "manifest.json").read_text())
    n_rows = {f["path"]: f["n_rows"] for f in manifest["files"]}
    results = []
    for name, top, datasets in variants(export_dir):
        try:
            r = run_variant(name, top, datasets, export_dir, a.model_dir, a.work.resolve(), n_rows)
        except Exception as exc:
            r = {"variant": name, "ok": False, "exported": None, "prepared": None, "problems": [f"{type(exc).__name__}: {exc}"[:800]]}
        results.append(r)
        status = "PASS" if r["ok"] else "FAIL"
        print(f"[axolotl] {status} {name} ({', '.join(r.get('files', []))}): exported {r['exported']} prepared {r['prepared']}"
              + (f" prompt-masked {r['prompt_masked']} answer=labels {r['answer_is_label']} all-turns-trained {r['all_turns_trained']}"
                     f" chat-roles {r['chat_roles_only']}" if "prompt_masked" in r else "")
              + ("" if r["ok"] else " — " + "; ".join(r["problems"])), flush=True)
    return finish(results, a.json)


if __name__ == "__main__":
    sys.exit(main())
