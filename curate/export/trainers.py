"""Trainer configs written beside an export: LLaMA-Factory ``dataset_info.json``, an axolotl
``datasets:`` block and a TRL loading snippet (schemas: docs/exports.md)."""

from __future__ import annotations

from typing import Any

import yaml


def _entry_name(name: str, layout: str, file_type: str) -> str:
    return f"{name}_{layout}" if file_type == "jsonl" else f"{name}_{layout}_{file_type}"


def dataset_info(files: list[dict], name: str) -> dict[str, Any]:
    """LLaMA-Factory entries; ``file_name`` is relative to the export folder (its ``dataset_dir``)."""
    info: dict[str, Any] = {}
    for f in files:
        layout, has = f["layout"], set(f.get("has", []))
        entry: dict[str, Any] = {"file_name": f["path"]}
        if layout == "messages":
            tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                    "system_tag": "system", "observation_tag": "tool"}
            entry.update(formatting="sharegpt", columns={"messages": "messages", **({"tools": "tools"} if "tools" in has else {})},
                         tags=tags)
        elif layout == "sharegpt":
            cols = {"messages": "conversations"}
            cols.update({c: c for c in ("system", "tools") if c in has})
            entry.update(formatting="sharegpt", columns=cols)
        elif layout == "alpaca":
            cols = {"prompt": "instruction", "query": "input", "response": "output"}
            cols.update({c: c for c in ("system", "history") if c in has})
            entry.update(columns=cols)
        else:  # prompt_completion has no native LLaMA-Factory form
            continue
        info[_entry_name(name, layout, f["file_type"])] = entry
    return info


def axolotl_yaml(files: list[dict], max_length: int) -> str:
    """The messages file as a chat_template dataset; the sharegpt file as a commented alternative
    (with a ``roles`` map, so that ``function_call`` / ``observation`` turns become assistant / tool)."""
    blocks = []
    for f in files:
        if f["file_type"] != "jsonl":
            continue
        if f["layout"] == "messages":
            blocks.append({"path": f["path"], "ds_type": "json", "type": "chat_template", "field_messages": "messages",
                           "roles_to_train": ["assistant"], "train_on_eos": "turn"})
    doc = {"sequence_len": max_length, "excess_length_strategy": "truncate", "datasets": blocks}
    head = (
        "# axolotl dataset block written by curate. Paths are relative to this folder: run axolotl from here\n"
        "# or make them absolute. sequence_len comes from the export's max_length; axolotl's own default\n"
        "# (512, with long rows dropped) would damage a subset selected for long responses.\n"
    )
    alt = ""
    for f in files:
        if f["file_type"] == "jsonl" and f["layout"] == "sharegpt":
            alt = (
                "# Alternative: the legacy sharegpt file\n"
                f"#  - path: {f['path']}\n#    ds_type: json\n#    type: chat_template\n#    field_messages: conversations\n"
                "#    message_property_mappings: {role: from, content: value}\n"
                "#    # axolotl's default roles map human/gpt only: without this, function_call and observation\n"
                "#    # turns render under their own names and the tool call is not trained\n"
                "#    roles: {user: [human, user], assistant: [gpt, assistant, function_call], "
                "system: [system], tool: [observation, tool]}\n"
            )
    return head + yaml.safe_dump(doc, sort_keys=False) + alt


def trl_snippet(files: list[dict], max_length: int) -> str:
    """A loading script for TRL: the ``prompt_completion`` JSONL when exported (completion-only loss
    with any chat template), else the ``messages`` one. The file is read as one Arrow block so a
    ``tools`` column that is null in its first rows and a string later loads at any size (``datasets``
    reads 10 MB blocks by default and cannot cast a later string block to an earlier all-null one)."""
    pick = {(f["layout"], f["file_type"]): f["path"] for f in files}
    path = pick.get(("prompt_completion", "jsonl")) or pick.get(("messages", "jsonl")) or next(iter(pick.values()), "")
    loss = ("completion-only loss by default" if "prompt_completion" in path else
            "loss on the whole conversation; assistant_only_loss=True needs a chat template with {% generation %} markers")
    return f'''"""Load the curated subset into TRL's SFTTrainer (written by curate; {loss}).

    python trl_load.py [MODEL_ID_OR_DIR]
"""
import sys
from pathlib import Path

from datasets import load_dataset

HERE = Path(__file__).parent
MAX_LENGTH = {max_length}  # the export's max_length; TRL's default (1024) would cut longer rows
DATA = HERE / "{path}"

# one block for the whole file: Arrow then unifies a tools column that is null in the first rows
dataset = load_dataset("json", data_files=str(DATA), split="train", chunksize=max(10 << 20, DATA.stat().st_size + 1))


def trainer(model_id: str, **config):
    """An SFTTrainer on the curated subset; ``config`` overrides SFTConfig fields (max_steps, …)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**{{"max_length": MAX_LENGTH, "output_dir": "checkpoints", **config}})
    return SFTTrainer(model=model_id, args=args, train_dataset=dataset)


if __name__ == "__main__":
    trainer(sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM2-135M-Instruct").train()
'''
