"""What a training run is: the ``train:`` section of a flow, or ``curate train --set …``::

    train:
      model: smollm2-135m-instruct      # bundled short name, local dir, .gguf file or hub id
      layout: prompt_completion         # or messages (needs a chat template with generation markers)
      method: lora                      # or full
      lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
      learning_rate: 2.0e-4
      epochs: 3
      batch_tokens: 16384               # tokens per optimizer step (rows per step from the data's mean length)
      max_length: null                  # null: the export manifest's max_length
      seed: 0
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from curate.records import canonical_json, sha256_hex


class LoRASpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="Module names to adapt, or all-linear (every linear layer but the LM head).")


class TrainSpec(BaseModel):
    """One supervised fine-tuning run on an export (TRL ``SFTTrainer``; PEFT LoRA by default)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("smollm2-135m-instruct", description="The base model: bundled short name, local dir, .gguf file or hub id.")
    revision: str | None = None
    layout: Literal["prompt_completion", "messages"] = Field(
        "prompt_completion", description="Which export file to train on, read unchanged. prompt_completion: loss on the final "
        "assistant reply (earlier turns are context); messages: loss on every assistant reply (needs a chat template with "
        "{% generation %} markers, e.g. chat_template: chatml).")
    file_type: Literal["jsonl", "parquet"] = "jsonl"
    chat_template: str | None = Field(None, description="null: the base model's own; a named one (chatml); or a path to a .jinja file.")
    method: Literal["lora", "full"] = "lora"
    lora: LoRASpec = Field(default_factory=LoRASpec)
    learning_rate: float | None = Field(None, gt=0, description="Default 2e-4 for LoRA, 2e-5 for full fine-tuning.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_tokens: int = Field(16384, gt=0, description="Tokens per optimizer step: rows per step = batch_tokens / the data's mean tokenized length.")
    micro_batch_tokens: int | None = Field(None, gt=0, description="Padded tokens per forward (gradient accumulation makes up the rest); "
                                           "default 4096 on CPU, 32768 on GPU.")
    max_length: int | None = Field(None, gt=1, description="Tokens per row (longer rows are cut at the end); null: the export manifest's max_length.")
    seed: int = 0
    device: str = Field("auto", description="auto = cuda when available, else cpu.")
    bf16: bool | None = Field(None, description="null: on where the GPU supports bf16.")
    gradient_checkpointing: bool | None = Field(None, description="null: on for GPU, off for CPU.")
    device_map: str | None = Field(None, description="Passed to from_pretrained (e.g. auto to spread a large model over GPUs).")
    logging_steps: int = Field(1, gt=0, description="The loss curve's resolution, in optimizer steps.")
    save_steps: int = Field(500, gt=0, description="Checkpoint every this many steps; a killed run resumes from the last one.")
    torch_threads: int | None = Field(None, gt=0, description="CPU threads (default: min(2, CPU count)).")

    @property
    def lr(self) -> float:
        return self.learning_rate or (2e-4 if self.method == "lora" else 2e-5)

    def resolved(self, gpu: bool, bf16_supported: bool = False) -> dict:
        """The settings that decide the numbers, with every ``null`` resolved for this machine."""
        return {"learning_rate": self.lr, "bf16": self.bf16 if self.bf16 is not None else (gpu and bf16_supported),
                "micro_batch_tokens": self.micro_batch_tokens or (32768 if gpu else 4096)}

    def key(self, data_sha256: str, resolved: dict | None = None, model_revision: str | None = None, template_sha256: str | None = None) -> str:
        """Hash of what the run computes: this config (minus how it runs: device, threads, logging,
        checkpointing), the values it resolves to on this machine, the base model's revision, the
        training template's text and the exact data file."""
        how = {"device", "device_map", "logging_steps", "save_steps", "torch_threads", "gradient_checkpointing"}
        return sha256_hex(canonical_json({"train": self.model_dump(mode="json", exclude=how), "resolved": resolved,
                                          "model_revision": model_revision, "template": template_sha256, "data": data_sha256}))
