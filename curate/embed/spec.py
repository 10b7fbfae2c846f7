"""What an embed stage is: the ``embed:`` section of a flow (the embedders' ``Params``)::

    embed:
      method: sentence_transformers     # curate/embed/__init__.py lists them; or precomputed
      model: all-MiniLM-L6-v2           # bundled short name, local dir or hub id (precomputed: the producer's name)
      text: conversation                # or prompt / response
      storage: float32                  # or float16 (half the disk and memory of large-pool selection)
      backend: auto                     # openvino where curate[cpu-fast] is installed (CPU, fp32, a local model), else torch
      quantize: none                    # or int8 (onnx / openvino only)

``backend`` / ``quantize`` (sentence_transformers only): the transformer runs under ONNX Runtime or OpenVINO
(``pip install 'curate[cpu-fast]'``) from a model exported once into ``$CURATE_CACHE_DIR/embed-models/``
(:func:`curate.embed.export.export_folder`); tokenisation and pooling stay sentence-transformers'. ``auto`` (the
default) is resolved by the embedder (:func:`curate.embed.sentence_transformer.resolve_backend`): openvino for a
bundled or local model on the CPU in float32 without quantisation where openvino and onnx import, else torch. A backend
other than torch enters the store key.

Kept beside the embedders (as ``train/spec.py`` sits in ``train/``); ``curate.config`` imports it from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EmbedSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field("sentence_transformers", description="The embedder (curate/embed/__init__.py lists them).")
    model: str = Field("all-MiniLM-L6-v2", description="Model id, local dir, or a bundled short name.")
    revision: str | None = None
    text: Literal["conversation", "prompt", "response"] = "conversation"
    batch_size: int = Field(64, gt=0)
    max_seq_length: int | None = Field(None, gt=0, description="Default: the model's own (MiniLM: 256).")
    normalize: bool = True
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    storage: Literal["float32", "float16"] = Field(
        "float32", description="How vectors are kept in the store: float16 halves the disk and memory traffic of large-pool selection "
        "(recorded in the store key).")
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="Runtime of the transformer: torch, or onnx (ONNX Runtime) / openvino on CPU from an exported model. "
        "auto: openvino (the same fp32 vectors within 1e-6, about 2x faster) for a bundled or local sentence_transformers model on "
        "the CPU in float32 without quantize where curate[cpu-fast] is installed, else torch.")
    quantize: Literal["none", "int8"] = Field("none", description="int8: the exported model quantised (onnx / openvino only).")

    @model_validator(mode="after")
    def _backend_fits(self) -> EmbedSpec:
        if self.quantize != "none" and self.backend in ("torch", "auto"):
            raise ValueError(f"embed.quantize: {self.quantize} needs embed.backend onnx or openvino (torch runs the model as it is)")
        if self.backend not in ("torch", "auto"):
            if self.method != "sentence_transformers":
                raise ValueError(f"embed.backend: {self.backend} is for method sentence_transformers, not {self.method}")
            if self.device != "cpu":
                raise ValueError(f"embed.backend: {self.backend} runs on the CPU; device '{self.device}' needs backend torch")
            if self.dtype != "float32":
                raise ValueError(f"embed.backend: {self.backend} runs the exported float32 model; dtype {self.dtype} needs backend torch "
                                 "(quantize: int8 is the reduced precision of onnx / openvino)")
        return self
