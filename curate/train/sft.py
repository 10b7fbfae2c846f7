"""Supervised fine-tuning on an export: TRL ``SFTTrainer``, PEFT LoRA (default) or full fine-tuning.

:func:`train` reads one export file *unchanged* (``messages`` or ``prompt_completion``, JSONL or
Parquet, through ``datasets``), so what trains is exactly what a user takes elsewhere, and writes a
train directory::

    <run>/train/<key[:12]>/
      train.json        config, the export's manifest and data-file sha256, trainer versions,
                        the batch it chose, the loss curve, tokens/s, where the weights are
      adapter/          the LoRA adapter and tokenizer (method: lora; loads back with curate.models)
      model/            the full model and tokenizer (method: full)
      loss.png          the loss curve
      checkpoints/      the last checkpoint while running (a killed run resumes from it)

The key hashes the config and the data file's sha256: a finished key is not trained again.

Loss is on assistant tokens only: the ``prompt_completion`` layout uses TRL's completion-only loss
(the final reply; earlier turns are context), the ``messages`` layout TRL's ``assistant_only_loss``
(every reply), which needs a chat template with ``{% generation %}`` markers (``chat_template:
chatml``; the base model's own template otherwise, checked before anything loads).

Batch by tokens: rows per optimizer step = ``batch_tokens`` / the mean tokenized row length;
rows per forward = ``micro_batch_tokens`` / the longest row; gradient accumulation makes up the
difference. Rows are grouped by length to pad less. GPU: bf16 where supported, gradient
checkpointing, ``device_map`` passed through; CPU: fp32, ``torch_threads`` threads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import ConfigError, CurateError, require
from curate.train.spec import TrainSpec

log = logging.getLogger("curate.train")
INSTALL = "pip install 'curate[train]'  (trl and peft)"


@dataclass(frozen=True)
class ExportFile:
    """The export a run trains on: its folder, manifest, and the one data file for the layout."""

    export_dir: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    path: Path
    sha256: str
    n_rows: int
    layout: str
    file_type: str

    @property
    def run_dir(self) -> Path:
        """Where train directories go: beside the export (in the curation run's output_dir)."""
        return self.export_dir.parent


def locate_export(path: str | os.PathLike, layout: str, file_type: str = "jsonl") -> ExportFile:
    """The export under ``path`` (a run's output_dir or its export folder) and its ``layout`` file.
    Raises ConfigError naming what is missing."""
    import hashlib

    from curate.history import run_dir

    p = run_dir(path)  # a versioned output folder: its latest run
    candidates = [p, p / "export"]
    if (p / "run.json").exists():
        run = json.loads((p / "run.json").read_text())
        if run.get("export", {}).get("dir"):
            candidates.insert(0, Path(run["export"]["dir"]))
    export_dir = next((c for c in candidates if (c / "manifest.json").exists()), None)
    if export_dir is None:
        raise ConfigError(f"{p}: no export here (looked for manifest.json in {', '.join(str(c) for c in candidates)}); "
                          "give a run's output_dir or its export folder")
    raw = (export_dir / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    entry = next((f for f in manifest.get("files", []) if f["layout"] == layout and f["file_type"] == file_type), None)
    if entry is None:
        have = sorted({f"{f['layout']}/{f['file_type']}" for f in manifest.get("files", [])})
        raise ConfigError(f"{export_dir}/manifest.json: the export has no {layout} {file_type} file (it has {', '.join(have) or 'none'}); "
                          f"add '{layout}' to export.layouts and re-run, or set train.layout")
    data = export_dir / entry["path"]
    if not data.exists():
        raise ConfigError(f"{data}: listed in the manifest but missing")
    from curate.io import file_sha256

    if file_sha256(data) != entry["sha256"]:
        raise ConfigError(f"{data}: its sha256 is not the one in {export_dir}/manifest.json: the file was changed after export; "
                          "re-run the export instead of editing it")
    return ExportFile(export_dir, manifest, hashlib.sha256(raw).hexdigest(), data, entry["sha256"], int(entry["n_rows"]), layout, file_type)


def train_dir(export: ExportFile, key: str) -> Path:
    return export.run_dir / "train" / key[:12]


def run_key(spec: TrainSpec, export: ExportFile) -> str:
    """The key of training ``spec`` on ``export`` here (see :meth:`TrainSpec.key`)."""
    import hashlib

    from curate.models import model_revision
    from curate.train.chat_templates import chat_template_text

    template = hashlib.sha256(chat_template_text(spec.chat_template).encode()).hexdigest() if spec.chat_template else None
    return spec.key(export.sha256, _resolved(spec), model_revision(spec.model, spec.revision), template)


def finished(out: Path, key: str) -> dict[str, Any] | None:
    """The record of a finished run with this key in ``out``, or None."""
    f = out / "train.json"
    if f.exists():
        rec = json.loads(f.read_text())
        if rec.get("status") == "done" and rec.get("key") == key:
            return rec
    return None


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("curate", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def train(spec: TrainSpec, source: str | os.PathLike | ExportFile, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train ``spec`` on the export at ``source``; return the train record (also ``train.json``).
    A finished run with the same key is returned as it is; a killed one resumes from its checkpoint."""
    export = source if isinstance(source, ExportFile) else locate_export(source, spec.layout, spec.file_type)
    key = run_key(spec, export)
    out = Path(out_dir) if out_dir else train_dir(export, key)
    done = finished(out, key)
    if done is not None:
        log.info("train: %s already trained (%s)", key[:12], out)
        return done
    require("trl", "curate train", INSTALL)
    if spec.method == "lora":
        require("peft", "curate train (LoRA)", INSTALL)
    return _train(spec, export, key, out)


def _device(spec: TrainSpec) -> str:
    from curate.lm.base import resolve_device

    return resolve_device(spec.device)


def _resolved(spec: TrainSpec) -> dict[str, Any]:
    """The spec's machine-dependent defaults resolved here (the key and the trainer use the same values)."""
    gpu = _device(spec).startswith("cuda")
    bf16_ok = False
    if gpu:
        import torch

        bf16_ok = torch.cuda.is_bf16_supported()
    return spec.resolved(gpu, bf16_ok)


def _tokenizer(spec: TrainSpec, location: str, revision: str | None = None):
    from transformers import AutoTokenizer

    from curate.train.chat_templates import chat_template_text, has_generation_markers

    tok = AutoTokenizer.from_pretrained(location, revision=revision)
    if spec.chat_template:
        tok.chat_template = chat_template_text(spec.chat_template)
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"train.model {spec.model!r}: its tokenizer has no chat template; set train.chat_template (e.g. chatml)")
    if spec.layout == "messages" and not has_generation_markers(tok.chat_template):
        raise ConfigError(f"train.layout messages puts the loss on assistant turns only, which needs a chat template with "
                          f"{{% generation %}} markers; {spec.model!r}'s own has none: set train.chat_template: chatml "
                          f"(or a .jinja file with markers), or use layout: prompt_completion")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class Prepared:
    """A trainer ready to run and what was decided on the way (see :func:`prepare`)."""

    trainer: Any
    tokenizer: Any
    base: Any
    batch: dict[str, Any]
    device: str
    bf16: bool
    checkpointing: bool
    max_length: int
    ckpt_dir: Path


def prepare(spec: TrainSpec, export: ExportFile, out: Path) -> Prepared:
    """Load the export (unchanged), the base model and tokenizer, choose the batch, and build the
    ``SFTTrainer`` (with the LoRA adapter unless ``method: full``); nothing is trained yet."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from curate.models import resolve_model, set_torch_threads
    from curate.progress import silence_library_bars

    silence_library_bars(before_loading=True)  # one log line per logged step instead (train)
    device = _device(spec)
    set_torch_threads(spec.torch_threads or min(2, os.cpu_count() or 1))
    gpu = device.startswith("cuda")
    resolved = _resolved(spec)
    bf16 = resolved["bf16"]
    checkpointing = spec.gradient_checkpointing if spec.gradient_checkpointing is not None else gpu
    max_length = spec.max_length or int(export.manifest.get("max_length") or 1024)
    base = resolve_model(spec.model, spec.revision)
    hub_revision = base.revision if base.source == "hub" else None
    tok = _tokenizer(spec, base.location, hub_revision)
    if export.file_type == "jsonl":  # one block: a tools column null in the first 10 MB and a string later cannot be cast
        dataset = datasets.load_dataset("json", data_files=str(export.path), split="train",
                                        chunksize=max(10 << 20, export.path.stat().st_size + 1))
    else:
        dataset = datasets.load_dataset("parquet", data_files=str(export.path), split="train")
    if len(dataset) == 0:
        raise CurateError(f"{export.path}: the export has no rows to train on")
    log.info("train: %s on %s (%d rows, %s, %s) → %s", spec.model, export.path, len(dataset), spec.layout, spec.method, out)

    # LoRA: the frozen base in bf16 (the adapter's weights stay fp32 in PEFT); full fine-tuning: fp32
    # master weights with bf16 autocast (bf16 weights would round most AdamW updates away)
    model = AutoModelForCausalLM.from_pretrained(base.location, dtype=torch.bfloat16 if bf16 and spec.method == "lora" else torch.float32,
                                                 device_map=spec.device_map, revision=hub_revision)
    peft_config = None
    if spec.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                                 target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
    ckpt_dir = out / "checkpoints"
    batch = _token_batch(spec, row_lengths(tok, dataset, max_length), resolved["micro_batch_tokens"])
    args = dict(
        output_dir=str(ckpt_dir), learning_rate=spec.lr, lr_scheduler_type=spec.lr_scheduler,
        weight_decay=spec.weight_decay, num_train_epochs=spec.epochs, max_steps=spec.max_steps or -1,
        per_device_train_batch_size=batch["rows_per_forward"], gradient_accumulation_steps=batch["accumulation"],
        max_length=max_length, assistant_only_loss=spec.layout == "messages",
        seed=spec.seed, data_seed=spec.seed, bf16=bf16, use_cpu=not gpu,
        logging_steps=spec.logging_steps, logging_first_step=True, save_steps=spec.save_steps, save_total_limit=1,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        **_version_args(SFTConfig, spec.warmup_ratio, checkpointing),
    )
    if spec.layout == "prompt_completion":
        args["completion_only_loss"] = True
    trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=dataset, processing_class=tok, peft_config=peft_config)
    return Prepared(trainer, tok, base, batch, device, bf16, checkpointing, max_length, ckpt_dir)


def _version_args(config_cls, warmup_ratio: float, checkpointing: bool) -> dict[str, Any]:
    """Arguments whose names changed across transformers releases (the GPU image may hold an older one)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    out["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = warmup_ratio  # 5.x: a float warmup_steps is a ratio
    out["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = checkpointing
    if "train_sampling_strategy" in fields:
        out["train_sampling_strategy"] = "group_by_length"  # rows of similar length together: less padding
    elif "group_by_length" in fields:
        out["group_by_length"] = True
    return out


def _train(spec: TrainSpec, export: ExportFile, key: str, out: Path) -> dict[str, Any]:
    from transformers import PrinterCallback, TrainerCallback

    t0 = time.perf_counter()
    prep = prepare(spec, export, out)
    trainer, tok, base, batch, ckpt_dir = prep.trainer, prep.tokenizer, prep.base, prep.batch, prep.ckpt_dir
    device, bf16, checkpointing, max_length = prep.device, prep.bf16, prep.checkpointing, prep.max_length
    log.info("train: %d rows per step (%d per forward × %d accumulated; mean row %.0f tokens, longest %d)",
             batch["rows_per_step"], batch["rows_per_forward"], batch["accumulation"], batch["mean_tokens"], batch["max_tokens"])

    class LogLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log.info("train: step %d/%d loss %.4f", state.global_step, state.max_steps, logs["loss"])

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogLines())
    marker = ckpt_dir / "KEY"
    if ckpt_dir.exists() and (not marker.exists() or marker.read_text().strip() != key):
        _cleanup(ckpt_dir)  # checkpoints of another config or export: never resumed
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume = any(ckpt_dir.glob("checkpoint-*"))
    marker.write_text(key + "\n")
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.perf_counter() - t0

    weights = out / ("adapter" if spec.method == "lora" else "model")
    if spec.method == "lora":
        # the adapter names its base as curate does (a bundled name or hub id as written, a local path made
        # absolute), so it loads back anywhere curate can resolve the base
        trainer.model.peft_config["default"].base_model_name_or_path = base.location if base.source == "local" else spec.model
    trainer.save_model(str(weights))
    tok.save_pretrained(str(weights))
    # the run's key inside the weights dir: two trainings into one folder never share a model revision
    from curate.io import write_json

    write_json(weights / "curate_train.json", {"key": key, "base_model": spec.model, "base_revision": base.revision})
    curve = [{"step": h["step"], "epoch": round(h.get("epoch", 0.0), 4), "loss": h["loss"], "learning_rate": h.get("learning_rate")}
             for h in trainer.state.log_history if "loss" in h]
    epochs_done = trainer.state.epoch or 0.0
    tokens = batch["total_tokens"] * epochs_done
    record = {
        "status": "done", "key": key, "config": spec.model_dump(mode="json"),
        "base_model": {"name": spec.model, "location": base.location, "revision": base.revision, "source": base.source},
        "export": {"dir": str(export.export_dir), "manifest_sha256": export.manifest_sha256, "file": str(export.path),
                   "sha256": export.sha256, "n_rows": export.n_rows, "layout": export.layout,
                   "config_hash": export.manifest.get("keys", {}).get("config_hash")},
        "versions": versions(), "device": device, "bf16": bf16, "gradient_checkpointing": checkpointing, "max_length": max_length,
        "batch": batch, "steps": trainer.state.global_step, "epochs": epochs_done, "resumed": resume,
        "train_loss": result.training_loss, "loss_curve": curve,
        "first_loss": curve[0]["loss"] if curve else None, "last_loss": curve[-1]["loss"] if curve else None,
        "seconds": seconds, "train_seconds": result.metrics.get("train_runtime"),
        "tokens_per_s": tokens / result.metrics["train_runtime"] if result.metrics.get("train_runtime") else None,
        "weights": str(weights), "method": spec.method,
    }
    _plot(curve, out / "loss.png", f"{spec.model} · {spec.method} · {export.n_rows} rows")
    from curate.io import write_json

    write_json(out / "train.json", record)
    _cleanup(ckpt_dir)
    log.info("train: done in %.0f s, loss %.4f → %.4f; %s", seconds, record["first_loss"] or math.nan, record["last_loss"] or math.nan, weights)
    return record


def row_lengths(tok, dataset, max_length: int) -> list[int]:
    """Tokens of each row as the chat template renders it (prompt and completion, or the messages), cut at ``max_length``."""
    out = []
    for row in dataset:
        msgs = row["messages"] if "messages" in row else list(row["prompt"]) + list(row["completion"])
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        ids = tok.apply_chat_template(msgs, tools=tools or None, tokenize=True, return_dict=False)
        out.append(min(len(ids), max_length))
    return out


def _token_batch(spec: TrainSpec, lengths: list[int], micro: int) -> dict[str, Any]:
    """Rows per optimizer step and per forward from the rows' token lengths (see module docstring)."""
    mean = sum(lengths) / len(lengths)
    longest = max(lengths)
    per_step = max(1, min(len(lengths), round(spec.batch_tokens / mean)))
    per_forward = max(1, min(per_step, micro // longest))
    accumulation = math.ceil(per_step / per_forward)
    per_forward = math.ceil(per_step / accumulation)  # spread evenly: a step holds per_step rows, not up to per_forward - 1 more
    return {"rows_per_step": min(per_forward * accumulation, len(lengths)), "rows_per_forward": per_forward, "accumulation": accumulation,
            "mean_tokens": mean, "max_tokens": longest, "total_tokens": sum(lengths), "batch_tokens": spec.batch_tokens,
            "micro_batch_tokens": micro}


def _plot(curve: list[dict], path: Path, title: str) -> None:
    if not curve:
        return
    from curate.report.plots import pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    save_png(fig, path)


def _cleanup(ckpt_dir: Path) -> None:
    """A finished run keeps its weights and record, not its resume checkpoints."""
    import shutil

    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
