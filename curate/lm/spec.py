"""How a scorer names its language model and backend (flat keys in the flow YAML)::

    score:
      - method: superfiltering
        backend: hf                     # hf | vllm | openai
        model: smollm2-135m-instruct    # bundled short name, local dir, .gguf file or hub id
        dtype: auto                     # scorers' default: bf16-matmul on a CPU with avx512_bf16/AMX, bfloat16 on a bf16 GPU
        runtime: auto                   # loss scorers' (deita's, SelectIT's) default: openvino on a CPU where installed, else torch
        max_tokens_per_batch: 8192
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


Runtime = Literal["torch", "openvino", "auto"]


def auto_runtime():
    """The ``runtime`` field of the scorers whose forwards OpenVINO can run (loss scorers, rating-token judges): ``auto``."""
    return Field("auto", description="What runs the model's forward: auto: openvino (the fp32 model compiled by OpenVINO; torch's "
                 "numbers within ~1e-5, faster on CPUs) on a CPU where curate[cpu-fast] is installed and the dtype is auto or "
                 "float32, else torch. openvino is in the store key (the loss scorers record the reason in dtype_reason).")


class LMParams(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    backend: Literal["hf", "vllm", "openai"] = Field("hf", description="hf: transformers in-process; vllm: vllm.LLM in-process; "
                                                     "openai: any OpenAI-compatible endpoint (vllm serve included).")
    model: str = Field("smollm2-135m-instruct", description="Bundled short name, local dir, .gguf file, or hub id.")
    revision: str | None = None
    tokenizer: str | None = Field(None, description="Tokenizer id/dir when it differs from the model (openai backend: the served model's).")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "bf16-matmul"] = Field(
        "float32", description="Model weights and math. auto (the loss scorers' default; resolved once per run, recorded with its "
        "reason): bf16-matmul on a CPU with avx512_bf16 or AMX, float32 on other CPUs, bfloat16 on a CUDA device with bf16 support. "
        "bf16-matmul (hf backend, CPU): fp32 weights, fp32 matmuls computed in oneDNN's bf16 math mode (fp32's scores within 2e-5). "
        "With a bf16/fp16 body the hf backend runs the final norm, the LM head and the log-sum-exp in fp32; losses always accumulate "
        "in fp32.")
    runtime: Runtime = Field(
        "torch", description="hf backend: what runs the model's forward for scoring (score, next_token; generation always runs in "
        "torch). openvino: the fp32 model exported once and compiled by OpenVINO (curate[cpu-fast]; CPU, float32 only; torch's "
        "numbers within about 1e-5 relative, faster). auto (the loss scorers' and rating-token judges' default): openvino on a CPU when it is installed and "
        "the dtype is auto or float32, else torch; resolved once per run and recorded with its reason. The vllm and openai backends "
        "run the model themselves (auto and torch leave them as they are).")
    device: str = Field("auto", description="auto = cuda when available, else cpu.")
    max_tokens_per_batch: int | None = Field(None, gt=0, description="Padded tokens per forward batch (halved on out-of-memory); "
                                              "default 2048 on CPU (padding costs more than batching gains there), 16384 on GPU.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code; only for models you trust.")
    base_url: str | None = Field(None, description="openai backend: e.g. http://127.0.0.1:8000/v1")
    served_name: str | None = Field(None, description="openai backend: the model name the server knows (default: model).")
    server: Literal["openai", "vllm"] = Field("openai", description="openai backend: what answers at base_url. openai: the plain "
                                              "OpenAI API (hosted APIs; only its documented request fields are sent); vllm: a "
                                              "`vllm serve` endpoint, which also gets vLLM's extensions (top_k, "
                                              "add_generation_prompt, continue_final_message).")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai backend: the environment variable holding the key.")
    concurrency: int = Field(8, gt=0, description="openai backend: requests in flight.")
    max_retries: int = Field(5, ge=0, description="openai backend: retries on 429/5xx/connection errors.")
    timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _cpu_math_on_hf(self):
        if self.dtype == "bf16-matmul" and self.backend != "hf":
            raise ValueError(f"dtype: bf16-matmul (the CPU's fp32 matmuls in bf16 math) is the hf backend's; the {self.backend} backend "
                             "takes bfloat16, float16 or float32")
        if self.runtime == "openvino" and self.backend != "hf":
            raise ValueError(f"runtime: {self.runtime} is the hf backend's (the {self.backend} backend runs the model itself)")
        if self.runtime == "openvino" and self.dtype not in ("auto", "float32"):
            raise ValueError(f"runtime: openvino runs the model in float32; dtype {self.dtype} needs runtime torch")
        if self.runtime == "openvino" and not self.device.startswith(("cpu", "auto")):
            raise ValueError(f"runtime: openvino runs on the CPU; device {self.device!r} needs runtime torch")
        return self

    @classmethod
    def of(cls, params: BaseModel, **update) -> LMParams:
        """The LM keys of a scorer's or step's parameters (which extend this model)."""
        return cls(**{k: getattr(params, k) for k in cls.model_fields}).model_copy(update=update)
