"""LLaMA-Factory load check for a curate export (run with the interpreter of a venv that has llamafactory).

For every entry of the export's ``dataset_info.json``: LLaMA-Factory's own argument parser, tokenizer
loader, template and ``get_dataset`` (stage ``sft``) convert and tokenize the file, then we check
  * converted rows == the manifest's ``n_rows`` for that file (nothing skipped or dropped);
  * no "Skipping this abnormal example" / "Dropped invalid example" / "Invalid role tag" warning;
  * labels mask the prompt: the first label is ignored, every row trains some tokens, the trained
    tokens of the last turn decode to the exported final answer, the first user text is masked, and
    every assistant-side turn is one trained span (LLaMA-Factory trains all of them by default);
  * rows with ``tools`` show their tool names in the rendered prompt.

    python lf_check.py EXPORT_DIR TOKENIZER_DIR [--template smollm2] [--json OUT.json]

Exit status 0 when every entry passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

BAD_WARNINGS = ("Skipping this abnormal example", "Dropped invalid example", "Invalid role tag", "Invalid message count")
from common import CHAT_ROLES, IGNORE, ROLE_HEADER, final_answer_and_first_user, rows_of, spans, trained_turns  # noqa: E402


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_entry(name: str, attrs: dict, n_expected: int, export_dir: Path, tok_dir: str, template_name: str,
                cutoff: int, work: Path) -> dict:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = dict(model_name_or_path=tok_dir, stage="sft", do_train=True, finetuning_type="lora", dataset=name,
                dataset_dir=str(export_dir), template=template_name, cutoff_len=cutoff, overwrite_cache=True,
                output_dir=str(work / name), report_to="none", preprocessing_num_workers=None)
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tok_module = load_tokenizer(model_args)
    tokenizer = tok_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    handler = Collect()
    lf_logger = logging.getLogger("llamafactory")
    lf_logger.addHandler(handler)
    try:
        module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tok_module)
    finally:
        lf_logger.removeHandler(handler)
    ds = module["train_dataset"]
    bad = [m for m in handler.messages if any(b in m for b in BAD_WARNINGS)]
    problems: list[str] = []
    if len(ds) != n_expected:
        problems.append(f"{len(ds)} converted rows, {n_expected} exported")
    if bad:
        problems.append(f"{len(bad)} skip/drop warnings, first: {bad[0][:300]}")
    rows = rows_of(export_dir / attrs["file_name"])
    if len(rows) != n_expected:
        problems.append(f"file has {len(rows)} rows, manifest says {n_expected}")
    eos = tokenizer.eos_token
    masked_ok = answer_ok = user_masked = truncated = with_tools = tools_rendered = turns_ok = 0
    first_bad: str | None = None
    aligned = len(ds) == len(rows)  # after a dropped row the per-row comparisons below mean nothing
    for i, (row, ex) in enumerate(zip(rows, ds) if aligned else ()):
        labels, ids = ex["labels"], ex["input_ids"]
        trained = [t for t in labels if t != IGNORE]
        answer, first_user = final_answer_and_first_user(row)
        if labels and labels[0] == IGNORE and trained:
            masked_ok += 1
        # the last contiguous trained span = the final answer (+ the template's end-of-turn)
        j = len(labels)
        while j > 0 and labels[j - 1] == IGNORE:
            j -= 1
        k = j
        while k > 0 and labels[k - 1] != IGNORE:
            k -= 1
        span = tokenizer.decode(labels[k:j], skip_special_tokens=False)
        if len(ids) >= cutoff:
            truncated += 1
        if span.replace(eos, "").strip() == answer.strip() or (len(ids) >= cutoff and answer.strip().startswith(span.replace(eos, "").strip())):
            answer_ok += 1
        elif first_bad is None:
            first_bad = f"row {i} ({row.get('id', '?')[:12]}): trained span {span[:120]!r} vs answer {answer[:120]!r}"
        if spans(labels) == trained_turns(row) or len(ids) >= cutoff:
            turns_ok += 1
        elif first_bad is None:
            first_bad = f"row {i}: {spans(labels)} trained spans for {trained_turns(row)} assistant-side turns"
        if row.get("tools"):  # the template must render the row's tool schemas into the prompt
            with_tools += 1
            tool_names = [t.get("function", t).get("name", "") for t in json.loads(row["tools"])]
            if all(nm and nm in tokenizer.decode(ids, skip_special_tokens=False) for nm in tool_names):
                tools_rendered += 1
        masked_text = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE], skip_special_tokens=False)
        if first_user.strip()[:200] in masked_text:
            user_masked += 1
        elif first_bad is None:
            first_bad = f"row {i}: first user text not in the masked part"
    n = len(ds) if aligned else 0
    if tools_rendered != with_tools:
        problems.append(f"{with_tools - tools_rendered} of {with_tools} rows with tools do not show their tool schemas")
    if turns_ok != n:
        problems.append(f"{n - turns_ok} rows where trained spans != assistant-side turns; {first_bad}")
    if masked_ok != n:
        problems.append(f"{n - masked_ok} rows with an unmasked prompt or nothing trained")
    if answer_ok != n:
        problems.append(f"{n - answer_ok} rows whose trained last span is not the exported answer; {first_bad}")
    if user_masked != n:
        problems.append(f"{n - user_masked} rows whose first user turn is not masked; {first_bad}")
    sample = ds[0] if len(ds) else {"input_ids": [], "labels": []}
    return {"entry": name, "file": attrs["file_name"], "formatting": attrs.get("formatting", "alpaca"),
            "exported": n_expected, "converted": len(ds), "prompt_masked": masked_ok, "answer_is_label": answer_ok, "all_turns_trained": turns_ok,
            "user_masked": user_masked, "with_tools": with_tools, "tools_rendered": tools_rendered, "truncated_at_cutoff": truncated, "bad_warnings": len(bad),
            "example_tokens": len(sample["input_ids"]), "example_trained_tokens": sum(t != IGNORE for t in sample["labels"]),
            "ok": not problems, "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("tokenizer_dir")
    ap.add_argument("--template", default="smollm2")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    export_dir = a.export_dir.resolve()
    info = json.loads((export_dir / "dataset_info.json").read_text())
    manifest = json.loads((export_dir / "manifest.json").read_text())
    n_rows = {f["path"]: f["n_rows"] for f in manifest["files"]}
    cutoff = int(manifest["max_length"])
    results = []
    with tempfile.TemporaryDirectory(prefix="lf_check_") as tmp:
        os.environ.setdefault("HF_DATASETS_CACHE", str(Path(tmp) / "hf_datasets"))
        for name, attrs in info.items():
            try:
                r = check_entry(name, attrs, n_rows[attrs["file_name"]], export_dir, a.tokenizer_dir, a.template, cutoff, Path(tmp))
            except Exception as exc:  # a loader error is a FAIL for this entry, not a crash of the check
                r = {"entry": name, "file": attrs["file_name"], "exported": n_rows.get(attrs["file_name"]), "converted": None,
                     "ok": False, "problems": [f"{type(exc).__name__}: {exc}"[:800]]}
            results.append(r)
            status = "PASS" if r["ok"] else "FAIL"
            print(f"[llamafactory] {status} {name}: exported {r['exported']} converted {r['converted']}"
                  + (f" prompt-masked {r['prompt_masked']} answer=labels {r['answer_is_label']} all-turns-trained {r['all_turns_trained']} tools {r['tools_rendered']}/{r['with_tools']}"
                     if "prompt_masked" in r else "")
                  + ("" if r["ok"] else " — " + "; ".join(r["problems"])), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
