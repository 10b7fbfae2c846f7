"""What an embed stage is: the ``embed:`` section of a flow (the embedders' ``Params``)::

    embed:
      method: sentence_transformers     # curate/embed/__init__.py lists them; or precomputed
      model: all-MiniLM-L6-v2           # bundled short name, local dir or hub id (precomputed: the producer's name)
      text: conversation                # or prompt / response
      storage: float32                  # or float16 (half the disk and memory of large-pool selection)

Kept beside the embedders (as ``train/spec.py`` sits in ``train/``); ``curate.config`` imports it from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
