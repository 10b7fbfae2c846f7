"""What a training run is: the ``train:`` section of a flow, or ``curate train --set …``::

    train:
      model: smollm2-135m-instruct      # bundled short name, local dir, .gguf file or hub id
      layout: messages                  # loss on every assistant reply; or prompt_completion (the final reply)
      method: lora                      # or full
      lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
      learning_rate: 2.0e-4
      epochs: 3
      batch_tokens: 16384               # tokens per optimizer step (rows per step from the data's mean length)
      max_length: null                  # null: the export manifest's max_length
      seed: 0
      eval_fraction: 0                  # rows held out (by seed) for an eval loss every eval_steps
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from curate.records import canonical_json, drop_defaults, sha256_hex


class LoRASpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear",
                                            description="Module names to adapt, or all-linear (every linear layer but the LM head).")


class TrainSpec(BaseModel):
    """One supervised fine-tuning run on an export (TRL ``SFTTrainer``; PEFT LoRA by default)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("smollm2-135m-instruct", description="The base model: bundled short name, local dir, .gguf file or hub id.")
    revision: str | None = None
    layout: Literal["messages", "prompt_completion"] = Field(
        "messages", description="Which export file to train on, read unchanged. messages (default): the loss on every "
        "assistant reply of a multi-turn row (TRL's assistant_only_loss, which needs a chat template with {% generation %} "
        "markers: see chat_template); prompt_completion: the loss on the final reply only (TRL's completion-only loss; "
        "earlier turns are context).")
    file_type: Literal["jsonl", "parquet"] = "jsonl"
    chat_template: str | None = Field(
        None, description="null: the base model's own. For layout messages, a template without {% generation %} markers "
        "is replaced by TRL's training variant of it (when TRL has one) or by ours that renders the same text (SmolLM2: "
        "smollm2, its own template with markers, default system prompt included); otherwise an error. Or a named one "
        "(chatml: ChatML without a default system prompt; smollm2), or a path to a .jinja file. The end-of-turn token of "
        "the template trained with joins eos_token_id in the weights' generation_config.json.")
    method: Literal["lora", "full"] = "lora"
    lora: LoRASpec = Field(default_factory=LoRASpec)
    learning_rate: float | None = Field(None, gt=0, description="Default 2e-4 for LoRA, 2e-5 for full fine-tuning.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_tokens: int = Field(16384, gt=0, description="Tokens per optimizer step: rows per step = batch_tokens / "
                              "the data's mean tokenized length.")
    steps_per_epoch: int | None = Field(None, gt=0, description="Optimizer steps per pass over the rows instead: rows per step = "
                                        "ceil(rows / steps_per_epoch), every row once a pass (the last step of a pass takes the rest); "
                                        "curate compare sets it so cells of equal tokens train equal steps. null: from batch_tokens.")
    micro_batch_tokens: int | None = Field(None, gt=0, description="Padded tokens per forward (gradient accumulation makes up the rest); "
                                           "default 1024 on CPU (activations in fp32 take ~4.5 MB per token for SmolLM2-135M: "
                                           "4096 took 18 GB), 32768 on GPU.")
    max_length: int | None = Field(None, gt=1, description="Tokens per row (longer rows are cut at the end); "
                                   "null: the export manifest's max_length.")
    seed: int = 0
    device: str = Field("auto", description="auto = cuda when available, else cpu.")
    bf16: bool | None = Field(None, description="null: on where the GPU supports bf16.")
    gradient_checkpointing: bool | None = Field(None, description="null: on for GPU, off for CPU.")
    device_map: str | None = Field(None, description="Passed to from_pretrained (e.g. auto to spread a large model over GPUs).")
    logging_steps: int = Field(1, gt=0, description="The loss curve's resolution, in optimizer steps.")
    save_steps: int = Field(500, gt=0, description="Checkpoint every this many steps; a killed run resumes from the last one.")
    torch_threads: int | None = Field(None, gt=0, description="CPU threads (default: min(2, CPU count)).")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="Where the trainer also logs: tensorboard (event files in <train dir>/tensorboard; needs "
        "pip install tensorboard) or wandb (needs pip install wandb and its login).")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the export's rows held out (drawn with seed) for "
                                 "an eval loss every eval_steps and at the end; 0: none. At least one row each side.")
    eval_steps: int = Field(50, gt=0, description="Eval loss every this many optimizer steps (with eval_fraction > 0).")
    packing: bool = Field(False, description="TRL's packing: rows packed into max_length sequences (best-fit decreasing, "
                          "padding-free). Meant for GPU runs with flash attention (attn_implementation).")
    padding_free: bool = Field(False, description="TRL's padding_free: each batch flattened into one sequence, no padding; "
                               "meant for GPU runs with flash attention. Needs packing (without it TRL does not cut rows at max_length).")
    attn_implementation: str | None = Field(None, description="Passed to from_pretrained (e.g. flash_attention_2); null: "
                                            "transformers' default.")
    fsdp: bool | str | None = Field(None, description="Several processes (torchrun / accelerate launch): the trainer's fsdp "
                                    "option, passed unchanged (true, with the settings in fsdp_config; older transformers: a "
                                    "string such as 'full_shard auto_wrap'); null: DDP (each process holds the whole model). "
                                    "Not in the key: it shards the same step over the processes.")
    fsdp_config: dict | str | None = Field(None, description="The trainer's fsdp_config (a dict or a JSON file), passed "
                                           "unchanged. Not in the key.")
    deepspeed: str | dict | None = Field(None, description="The trainer's deepspeed option: a DeepSpeed JSON config file or "
                                         "the config itself, passed unchanged (needs pip install deepspeed). In the key (a file by "
                                         "its content): a DeepSpeed config can set its own optimizer, scheduler and precision.")

    @property
    def lr(self) -> float:
        return self.learning_rate or (2e-4 if self.method == "lora" else 2e-5)

    def resolved(self, gpu: bool, bf16_supported: bool = False) -> dict:
        """The settings that decide the numbers, with every ``null`` resolved for this machine."""
        return {"learning_rate": self.lr, "bf16": self.bf16 if self.bf16 is not None else (gpu and bf16_supported),
                "micro_batch_tokens": self.micro_batch_tokens or (32768 if gpu else 1024)}

    def key(self, data_sha256: str, resolved: dict | None = None, model_revision: str | None = None,
            template_sha256: str | None = None) -> str:
        """Hash of what the run computes: this config (minus how it runs: device, threads, logging,
        checkpointing), the values it resolves to on this machine, the base model's revision, the
        training template's text and the exact data file. Of the several-process settings, ``fsdp`` and
        ``fsdp_config`` are how it runs (the same step, sharded), ``deepspeed`` is in (a config file by
        its content's sha256; unset, it adds nothing); the world size is in ``resolved`` (sft.py)."""
        how = {"device", "device_map", "logging_steps", "save_steps", "torch_threads", "gradient_checkpointing", "report_to",
               "fsdp", "fsdp_config", "deepspeed"}
        train = drop_defaults(self.model_dump(mode="json", exclude=how), {"steps_per_epoch": None})  # added later
        if self.deepspeed is not None:
            train["deepspeed"] = _file_sha256(self.deepspeed) if isinstance(self.deepspeed, str) else self.deepspeed
        return sha256_hex(canonical_json({"train": train, "resolved": resolved,
                                          "model_revision": model_revision, "template": template_sha256, "data": data_sha256}))


def _file_sha256(path: str) -> str:
    """``sha256:<hex>`` of a config file's bytes; the path as written when there is no such file."""
    import hashlib
    import os

    if not os.path.isfile(path):
        return path
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()
