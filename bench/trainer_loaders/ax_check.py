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

from common import CHAT_ROLES, IGNORE, ROLE_HEADER, final_answer_and_first_user, rows_of, spans, trained_turns  # noqa: E402
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
    masked = answer_ok = user_masked = truncated = turns_ok = roles_ok = 0
    first_bad = None
    aligned = len(ds) == len(rows)
    eos = tok.eos_token
    for i, (row, ex) in enumerate(zip(rows, ds) if aligned else ()):
        labels, ids = list(ex["labels"]), list(ex["input_ids"])
        trained = [t for t in labels if t != IGNORE]
        answer, first_user = final_answer_and_first_user(row)
        if labels and labels[0] == IGNORE and trained:
            masked += 1
        j = len(labels)
        while j > 0 and labels[j - 1] == IGNORE:
            j -= 1
        k = j
        while k > 0 and labels[k - 1] != IGNORE:
            k -= 1
        span = tok.decode(labels[k:j], skip_special_tokens=False).replace(eos, "").strip()
        cut = len(ids) >= int(top.get("sequence_len") or 512)
        truncated += cut
        if span == answer.strip() or (cut and answer.strip().startswith(span)):
            answer_ok += 1
        elif first_bad is None:
            first_bad = f"row {i}: trained span {span[:120]!r} vs answer {answer[:120]!r}"
        text = tok.decode(ids, skip_special_tokens=False)
        if set(ROLE_HEADER.findall(text)) <= CHAT_ROLES:
            roles_ok += 1
        elif first_bad is None:
            first_bad = f"row {i}: role headers {sorted(set(ROLE_HEADER.findall(text)) - CHAT_ROLES)} are not chat roles"
        if spans(labels) == trained_turns(row) or cut:
            turns_ok += 1
        elif first_bad is None:
            first_bad = f"row {i}: {spans(labels)} trained spans for {trained_turns(row)} assistant-side turns"
        masked_text = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE], skip_special_tokens=False)
        if first_user.strip()[:200] in masked_text:
            user_masked += 1
        elif first_bad is None:
            first_bad = f"row {i}: first user text not in the masked part"
    n = len(ds) if aligned else 0
    if roles_ok != n:
        problems.append(f"{n - roles_ok} rows rendered with non-chat role headers; {first_bad}")
    if turns_ok != n:
        problems.append(f"{n - turns_ok} rows where trained spans != assistant-side turns; {first_bad}")
    if masked != n:
        problems.append(f"{n - masked} rows with an unmasked prompt or nothing trained")
    if answer_ok != n:
        problems.append(f"{n - answer_ok} rows whose last trained span is not the exported answer; {first_bad}")
    if user_masked != n:
        problems.append(f"{n - user_masked} rows whose first user turn is not masked; {first_bad}")
    result.update(prompt_masked=masked, answer_is_label=answer_ok, all_turns_trained=turns_ok, chat_roles_only=roles_ok, user_masked=user_masked, truncated_at_sequence_len=truncated,
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
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
