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
import sys
import tempfile
from pathlib import Path

BAD_WARNINGS = ("Skipping this abnormal example", "Dropped invalid example", "Invalid role tag", "Invalid message count")
from common import IGNORE, LabelChecks, finish, rows_of  # noqa: E402


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
    with_tools = tools_rendered = 0
    checks = LabelChecks(tokenizer, cutoff)
    aligned = len(ds) == len(rows)  # after a dropped row the per-row comparisons below mean nothing
    for i, (row, ex) in enumerate(zip(rows, ds) if aligned else ()):
        labels, ids = list(ex["labels"]), list(ex["input_ids"])
        checks.row(i, row, ids, labels)
        if row.get("tools"):  # the template must render the row's tool schemas into the prompt
            with_tools += 1
            tool_names = [t.get("function", t).get("name", "") for t in json.loads(row["tools"])]
            if all(nm and nm in tokenizer.decode(ids, skip_special_tokens=False) for nm in tool_names):
                tools_rendered += 1
    n = len(ds) if aligned else 0
    if tools_rendered != with_tools:
        problems.append(f"{with_tools - tools_rendered} of {with_tools} rows with tools do not show their tool schemas")
    problems.extend(checks.problems(n))
    masked_ok, answer_ok, turns_ok, user_masked, truncated = checks.masked, checks.answer_ok, checks.turns_ok, checks.user_masked, checks.truncated
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
    return finish(results, a.json)


if __name__ == "__main__":
    sys.exit(main())
