"""Supervised fine-tuning on an export: TRL ``SFTTrainer``, PEFT LoRA (default) or full fine-tuning.

:func:`train` reads one export file *unchanged* (``messages`` or ``prompt_completion``, JSONL or
Parquet, through ``datasets``), so what trains is exactly what a user takes elsewhere, and writes a
train directory::

    <run>/train/<key[:12]>/
      train.json        config, the export's manifest and data-file sha256, trainer versions,
                        the batch it chose, the loss curve, tokens/s, where the weights are
      adapter/          the LoRA adapter and tokenizer (method: lora; loads back with curate.models)
      model/            the full model and tokenizer (method: full)
      loss.png          the loss curve (and the eval loss, with eval_fraction > 0)
      checkpoints/      the last checkpoint while running (a killed run resumes from it)
      tensorboard/      event files (report_to: tensorboard)

The key hashes the config and the data file's sha256: a finished key is not trained again.

Loss is on assistant tokens only: the ``messages`` layout (the default) uses TRL's
``assistant_only_loss`` (every reply of a multi-turn row), which needs a chat template with
``{% generation %}`` markers: the base model's own when it has them, else TRL's training variant of
it, else ours when it renders the same text (SmolLM2: ``smollm2``), else an error before anything
loads (:func:`curate.train.chat_templates.training_template`); the ``prompt_completion`` layout
uses TRL's completion-only loss (the final reply; earlier turns are context). The template's
end-of-turn token (ChatML: ``<|im_end|>``) joins ``eos_token_id`` in the weights'
``generation_config.json``, so generation stops where training taught the model to.

Resume: a checkpoint every ``save_steps``; a run killed and started again with the same key resumes
from its newest complete checkpoint (``train.json``: ``resumed``, ``resumed_from_step``; the loss
curve holds the steps of both processes). ``tokens_trained`` is the non-padding tokens of every
training step of the run (transformers' ``num_input_tokens_seen``, kept in the checkpoint);
``tokens_per_s`` is the tokens this launch trained (every process's, when there are several) over its
training seconds less the evals inside training: a resumed run counts only its own steps and time.

Batch by tokens: rows per optimizer step = ``batch_tokens`` / the mean tokenized row length (or,
with ``steps_per_epoch``, ceil(rows / steps_per_epoch): that many steps a pass, each row once);
rows per forward = ``micro_batch_tokens`` / the longest row; gradient accumulation makes up the
difference. Rows are grouped by length to pad less. GPU: bf16 where supported, gradient
checkpointing, ``device_map`` passed through; CPU: fp32, ``torch_threads`` threads.

Several processes (``torchrun`` / ``accelerate launch``; :mod:`curate.train.distributed`): rows per
step is the whole step over all of them, each process taking its share; only rank 0 writes the
train directory, the others return its record; ``tokens_trained`` counts every process's tokens
(the trainer gathers them); ``fsdp`` / ``deepspeed`` pass through to the trainer.
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
from curate.train import distributed
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

    if spec.chat_template:
        text = chat_template_text(spec.chat_template)
    else:  # the model's own (its revision is in the key) unless it is replaced for the messages layout
        from curate.models import resolve_model

        base = resolve_model(spec.model, spec.revision)
        tok = _tokenizer(spec, base.location, base.revision if base.source == "hub" else None)
        text = None if tok.curate_template_is_own else tok.chat_template
    template = hashlib.sha256(text.encode()).hexdigest() if text else None
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
    _check_options(spec, _device(spec))
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
    resolved = spec.resolved(gpu, bf16_ok)
    n = distributed.world_size()  # several processes split each step another way (the key differs; one process: unchanged)
    return {**resolved, "world_size": n} if n > 1 else resolved


def _tokenizer(spec: TrainSpec, location: str, revision: str | None = None):
    """The tokenizer with the chat template this run trains with (see :func:`training_template`);
    ``tok.curate_template_source`` says where the template came from."""
    from transformers import AutoTokenizer

    from curate.train.chat_templates import training_template

    tok = AutoTokenizer.from_pretrained(location, revision=revision)
    own = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    text, source = training_template(tok, spec.chat_template, spec.layout, spec.model)
    tok.chat_template = text
    tok.curate_template_source = source
    tok.curate_template_is_own = text == own
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_options(spec: TrainSpec, device: str) -> None:
    """Options that cannot work here, refused before anything loads."""
    import importlib.util

    if spec.report_to == "tensorboard":  # what transformers' TensorBoardCallback imports (or tensorboardX)
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            if importlib.util.find_spec("tensorboardX") is None:
                raise ConfigError(f"train.report_to: tensorboard is not installed here ({exc}): pip install tensorboard "
                                  "(or report_to: none)") from None
    if spec.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.report_to: wandb is not installed here: pip install wandb (or report_to: none)")
    if spec.padding_free and not spec.packing:
        raise ConfigError("train.padding_free without packing: TRL then does not cut rows at max_length (it refuses the "
                          "combination); set packing: true as well (TRL's packing is padding-free) or padding_free: false")
    distributed.check(spec)  # deepspeed installed, not with fsdp
    if (spec.packing or spec.padding_free) and not device.startswith("cuda"):
        raise ConfigError(f"train.packing / padding_free are for GPU runs with flash attention; the device here is {device}: "
                          "on a CPU they make one long sequence per batch, attended as a whole (no speed-up), so they are off there")


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
    eval_dataset: Any = None


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
    _check_options(spec, device)
    set_torch_threads(spec.torch_threads or distributed.default_threads())
    gpu = device.startswith("cuda")
    resolved = _resolved(spec)
    bf16 = resolved["bf16"]
    checkpointing = spec.gradient_checkpointing if spec.gradient_checkpointing is not None else gpu
    max_length = run_max_length(spec, export)
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
    dataset, eval_dataset = split_eval(spec, dataset)
    log.info("train: %s on %s (%d rows, %s, %s) → %s", spec.model, export.path, len(dataset), spec.layout, spec.method, out)

    # LoRA: the frozen base in bf16 (the adapter's weights stay fp32 in PEFT); full fine-tuning: fp32
    # master weights with bf16 autocast (bf16 weights would round most AdamW updates away)
    extra = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(base.location, dtype=torch.bfloat16 if bf16 and spec.method == "lora" else torch.float32,
                                                 device_map=spec.device_map, revision=hub_revision, **extra)
    peft_config = None
    if spec.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                                 target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
    ckpt_dir = out / "checkpoints"
    batch = _token_batch(spec, row_lengths(tok, dataset, max_length), resolved["micro_batch_tokens"], max_length if spec.packing else None,
                         distributed.world_size())
    args = dict(
        output_dir=str(ckpt_dir), learning_rate=spec.lr, lr_scheduler_type=spec.lr_scheduler,
        weight_decay=spec.weight_decay, num_train_epochs=spec.epochs, max_steps=spec.max_steps or -1,
        per_device_train_batch_size=batch["rows_per_forward"], gradient_accumulation_steps=batch["accumulation"],
        max_length=max_length, assistant_only_loss=spec.layout == "messages",
        seed=spec.seed, data_seed=spec.seed, bf16=bf16, use_cpu=not gpu,
        logging_steps=spec.logging_steps, logging_first_step=True, save_steps=spec.save_steps, save_total_limit=1,
        report_to=spec.report_to, disable_tqdm=True, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", packing=spec.packing, padding_free=spec.padding_free,
        **_version_args(SFTConfig, spec.warmup_ratio, checkpointing),
    )
    args.update(distributed.launch_args(spec, device))  # several processes: gloo on CPU; fsdp / deepspeed as given
    if spec.layout == "prompt_completion":
        args["completion_only_loss"] = True
    if eval_dataset is not None:
        args.update(eval_strategy="steps", eval_steps=spec.eval_steps, per_device_eval_batch_size=batch["rows_per_forward"])
    saved = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if spec.report_to == "tensorboard":  # read when the trainer builds its callback; checkpoints/ (the default) is removed at the end
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    try:
        trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=dataset, eval_dataset=eval_dataset,
                             processing_class=tok, peft_config=peft_config)
    finally:
        if spec.report_to == "tensorboard":
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None) if saved is None else os.environ.__setitem__("TENSORBOARD_LOGGING_DIR", saved)
    return Prepared(trainer, tok, base, batch, device, bf16, checkpointing, max_length, ckpt_dir, eval_dataset)


def split_eval(spec: TrainSpec, dataset):
    """(train rows, held-out rows or None): ``eval_fraction`` of the rows (rounded, at least one, and at
    least one left to train on), drawn with ``seed`` — the same export and seed hold out the same rows."""
    if not spec.eval_fraction:
        return dataset, None
    n = len(dataset)
    n_eval = max(1, round(n * spec.eval_fraction))
    if n - n_eval < 1:
        raise CurateError(f"train.eval_fraction {spec.eval_fraction}: the export has {n} row(s), "
                          f"too few to hold out {n_eval} and train on the rest")
    parts = dataset.train_test_split(test_size=n_eval, seed=spec.seed, shuffle=True)
    return parts["train"], parts["test"]


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
    trainer, base, batch, ckpt_dir, max_length = prep.trainer, prep.base, prep.batch, prep.ckpt_dir, prep.max_length
    log.info("train: %d rows per step (%d per forward × %d accumulated × %d processes; mean row %.0f tokens, longest %d)",
             batch["rows_per_step"], batch["rows_per_forward"], batch["accumulation"], batch["world_size"], batch["mean_tokens"],
             batch["max_tokens"])
    if spec.steps_per_epoch and batch["steps_per_pass"] != spec.steps_per_epoch:
        log.warning("train: %d rows make %d steps a pass at %d rows a step, not the %d of steps_per_epoch (%d processes): "
                    "with max_steps the rows do not all train the same number of times", len(trainer.train_dataset),
                    batch["steps_per_pass"], batch["rows_per_step"], spec.steps_per_epoch, batch["world_size"])

    class Track(TrainerCallback):
        """Log lines; this process's starting token count and eval seconds (for tokens/s)."""

        tokens_at_start = 0
        eval_seconds = 0.0

        def on_train_begin(self, args, state, control, **kw):
            Track.tokens_at_start = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log.info("train: step %d/%d loss %.4f", state.global_step, state.max_steps, logs["loss"])
            if logs and "eval_loss" in logs:
                Track.eval_seconds += logs.get("eval_runtime") or 0.0
                log.info("train: step %d/%d eval loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Track())
    distributed.same_order(trainer, spec.seed)  # each epoch's row order from the seed: the same in every process and after a resume
    rows_trained = len(trainer.train_dataset)
    held_out = len(prep.eval_dataset) if prep.eval_dataset is not None else 0
    if rows_trained < export.n_rows - held_out:  # TRL drops rows left without a trained token by the cut at max_length
        log.warning("train: %d of %d rows have no assistant token within max_length %d and do not train",
                    export.n_rows - held_out - rows_trained, export.n_rows - held_out, max_length)
    distributed.agree("the run's key", key)  # several processes: the same config, export and template everywhere
    resume_from = distributed.from_main(_resume_checkpoint, ckpt_dir, key)  # rank 0 cleans up and picks; the others take its pick
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state = trainer.state
    eval_seconds_in_train = Track.eval_seconds  # the evals inside train_runtime (the final one below is not)
    if prep.eval_dataset is not None and not any(h.get("step") == state.global_step and "eval_loss" in h for h in state.log_history):
        trainer.evaluate()  # the eval loss of the final weights
    seconds = time.perf_counter() - t0

    weights = out / ("adapter" if spec.method == "lora" else "model")
    if spec.method == "lora":
        # the adapter names its base as curate does (a bundled name or hub id as written, a local path made
        # absolute), so it loads back anywhere curate can resolve the base
        trainer.model.peft_config["default"].base_model_name_or_path = base.location if base.source == "local" else spec.model
    trainer.save_model(str(weights))  # every process (FSDP / DeepSpeed gather the weights in it); only rank 0 writes
    if not distributed.is_main():  # rank 0 writes the rest; the others wait for it and return its record
        distributed.barrier()
        record_path = out / "train.json"
        if not record_path.exists() or json.loads(record_path.read_text()).get("key") != key:
            raise CurateError(f"train: rank 0 did not write {record_path} (see its error above); this process's weights are not recorded")
        return json.loads(record_path.read_text())
    try:
        return _write_record(spec, export, key, out, prep, trainer, result, resume_from, rows_trained, seconds, weights,
                             Track.tokens_at_start, eval_seconds_in_train, Track.eval_seconds)
    finally:
        distributed.barrier()  # reached on an error too: the other processes stop waiting and report it


def _write_record(spec, export, key, out, prep, trainer, result, resume_from, rows_trained, seconds, weights,
                  tokens_at_start, eval_seconds_in_train, eval_seconds) -> dict[str, Any]:
    """Rank 0: the tokenizer, generation config, key file, train.json and loss.png beside the weights."""
    tok, base, batch, ckpt_dir = prep.tokenizer, prep.base, prep.batch, prep.ckpt_dir
    device, bf16, checkpointing, max_length = prep.device, prep.bf16, prep.checkpointing, prep.max_length
    state = trainer.state
    tok.save_pretrained(str(weights))
    eos = _save_generation_config(trainer.model, tok, weights)
    # the run's key inside the weights dir: two trainings into one folder never share a model revision
    from curate.io import write_json

    write_json(weights / "curate_train.json", {"key": key, "base_model": spec.model, "base_revision": base.revision})
    curve = [{"step": h["step"], "epoch": round(h.get("epoch", 0.0), 4), "loss": h["loss"], "learning_rate": h.get("learning_rate")}
             for h in state.log_history if "loss" in h]
    eval_curve = [{"step": h["step"], "epoch": round(h.get("epoch", 0.0), 4), "eval_loss": h["eval_loss"]}
                  for h in state.log_history if "eval_loss" in h]
    epochs_done = state.epoch or 0.0
    tokens_trained = int(state.num_input_tokens_seen)
    tokens_this_run = tokens_trained - int(tokens_at_start)
    train_seconds = result.metrics.get("train_runtime")
    busy = (train_seconds - eval_seconds_in_train) if train_seconds else None
    record = {
        "status": "done", "key": key, "config": spec.model_dump(mode="json"),
        "base_model": {"name": spec.model, "location": base.location, "revision": base.revision, "source": base.source},
        "export": {"dir": str(export.export_dir), "manifest_sha256": export.manifest_sha256, "file": str(export.path),
                   "sha256": export.sha256, "n_rows": export.n_rows, "layout": export.layout,
                   "config_hash": export.manifest.get("keys", {}).get("config_hash")},
        "versions": versions(), "device": device, "bf16": bf16, "gradient_checkpointing": checkpointing, "max_length": max_length,
        "chat_template": tok.curate_template_source, "eos_token_id": eos,
        "batch": batch, "rows_trained": rows_trained, "steps": state.global_step, "epochs": epochs_done,
        "resumed": resume_from is not None, "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else None,
        "train_loss": result.training_loss, "loss_curve": curve,
        "first_loss": curve[0]["loss"] if curve else None, "last_loss": curve[-1]["loss"] if curve else None,
        "eval_rows": len(prep.eval_dataset) if prep.eval_dataset is not None else 0,
        "eval_ids": list(prep.eval_dataset["id"]) if prep.eval_dataset is not None and "id" in prep.eval_dataset.column_names else None,
        "eval_curve": eval_curve, "eval_loss": eval_curve[-1]["eval_loss"] if eval_curve else None,
        "seconds": seconds, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "tokens_trained": tokens_trained, "tokens_this_run": tokens_this_run,
        "tokens_per_s": tokens_this_run / busy if busy else None,
        "weights": str(weights), "method": spec.method,
    }
    _plot(curve, out / "loss.png", f"{spec.model} · {spec.method} · {export.n_rows} rows", eval_curve)
    write_json(out / "train.json", record)
    _cleanup(ckpt_dir)
    log.info("train: done in %.0f s, loss %.4f → %.4f; %s", seconds, record["first_loss"] or math.nan,
             record["last_loss"] or math.nan, weights)
    return record


def _resume_checkpoint(ckpt_dir: Path, key: str) -> Path | None:
    """The newest complete checkpoint of this key in ``ckpt_dir`` (its ``trainer_state.json`` is
    written last and parses), or None; checkpoints of another key, and incomplete ones (a kill while
    saving), are removed."""
    import shutil

    marker = ckpt_dir / "KEY"
    if ckpt_dir.exists() and (not marker.exists() or marker.read_text().strip() != key):
        _cleanup(ckpt_dir)  # checkpoints of another config or export: never resumed
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")
    complete = []
    for c in ckpt_dir.glob("checkpoint-*"):
        try:
            json.loads((c / "trainer_state.json").read_text())
            complete.append((int(c.name.split("-")[-1]), c))
        except (OSError, ValueError):
            shutil.rmtree(c, ignore_errors=True)
    return max(complete)[1] if complete else None


def _save_generation_config(model, tok, weights: Path) -> list[int]:
    """Write ``generation_config.json`` into the weights dir with the training template's end-of-turn
    token added to the base's ``eos_token_id``; returns the ids."""
    import copy

    from curate.train.chat_templates import end_of_turn_id

    gen = copy.deepcopy(model.generation_config)
    eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eot = end_of_turn_id(tok, tok.chat_template)
    if eot is not None and eot not in eos:
        eos = [eot, *eos]
    gen.eos_token_id = eos
    gen.save_pretrained(str(weights))
    return eos


def run_max_length(spec: TrainSpec, export: ExportFile) -> int:
    """Tokens per row a run cuts at: ``spec.max_length``, else the export manifest's, else 1024."""
    return spec.max_length or int(export.manifest.get("max_length") or 1024)


def export_token_count(spec: TrainSpec, source: str | os.PathLike) -> int:
    """The tokens of the export at ``source`` (a run's output_dir or its export folder) as a run of
    ``spec`` would see them: the ``spec.layout`` / ``spec.file_type`` file, each row rendered by the
    training tokenizer's chat template and cut at :func:`run_max_length` (:func:`row_lengths`). Only
    the tokenizer loads, not the model (``curate compare`` sizes its steps with it)."""
    from curate.models import resolve_model

    export = locate_export(source, spec.layout, spec.file_type)
    base = resolve_model(spec.model, spec.revision)
    tok = _tokenizer(spec, base.location, base.revision if base.source == "hub" else None)
    if export.file_type == "jsonl":
        rows = [json.loads(line) for line in export.path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(export.path).to_pylist()
    return int(sum(row_lengths(tok, rows, run_max_length(spec, export))))


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


def _token_batch(spec: TrainSpec, lengths: list[int], micro: int, packed_length: int | None = None, world: int = 1) -> dict[str, Any]:
    """Rows per optimizer step and per forward from the rows' token lengths (see module docstring).
    ``packed_length`` (packing): the rows are sequences of that length, as many as the tokens fill.
    ``world``: processes sharing each step (DDP): ``rows_per_step`` is the whole step, over all of
    them; ``rows_per_forward`` × ``accumulation`` is one process's share (rounded up to whole rows)."""
    total = sum(lengths)
    if packed_length:
        lengths = [packed_length] * max(1, math.ceil(total / packed_length))
    mean = sum(lengths) / len(lengths)
    longest = max(lengths)
    if spec.steps_per_epoch:  # a fixed number of steps a pass: the last step of each pass takes the rows left
        per_step = math.ceil(len(lengths) / spec.steps_per_epoch)
    else:
        per_step = max(1, min(len(lengths), round(spec.batch_tokens / mean)))
    per_process = math.ceil(per_step / world)
    per_forward = max(1, min(per_process, micro // longest))
    fewest = math.ceil(per_process / per_forward)
    # accumulation: the fewest forwards whose equal shares make up per_process rows exactly, looking up to twice the
    # fewest (e.g. 5 rows at most 2 a forward: 5 × 1, not 3 × 2 = 6 rows); else the fewest, one share rounded up
    # with steps_per_epoch the step must hold exactly per_process rows (else a pass takes fewer steps): look up to per_process
    upto = per_process if spec.steps_per_epoch else min(2 * fewest, per_process)
    accumulation = next((a for a in range(fewest, upto + 1) if per_process % a == 0), fewest)
    per_forward = math.ceil(per_process / accumulation)
    rows_per_step = min(per_forward * accumulation * world, len(lengths))
    return {"rows_per_step": rows_per_step, "steps_per_pass": math.ceil(len(lengths) / rows_per_step), "rows_per_forward": per_forward,
            "accumulation": accumulation, "world_size": world, "mean_tokens": mean, "max_tokens": longest, "total_tokens": total,
            "batch_tokens": spec.batch_tokens, "micro_batch_tokens": micro, "packed": bool(packed_length)}


def _plot(curve: list[dict], path: Path, title: str, eval_curve: list[dict] | None = None) -> None:
    if not curve:
        return
    from curate.plotting import pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], marker="o", markersize=3, label="train")
    if eval_curve:
        ax.plot([c["step"] for c in eval_curve], [c["eval_loss"] for c in eval_curve], marker="s", markersize=3, label="eval (held out)")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    save_png(fig, path)


def _cleanup(ckpt_dir: Path) -> None:
    """A finished run keeps its weights and record, not its resume checkpoints."""
    import shutil

    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
