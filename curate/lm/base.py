"""The backend contract: one small interface over transformers, vLLM and OpenAI-compatible servers.

- ``score(seqs)``: masked token log-probabilities (IFD family, perplexity, DELIFT);
- ``fingerprint()``: what enters the score key (backend, model id, revision, dtype, quantization),
  computed without loading weights;
- ``tokenizer``: the model's tokenizer (spans are found with it, on this side, for every backend).
"""

from __future__ import annotations

from typing import Any, Protocol

from curate.lm.engine import Seq, SeqResult


class Backend(Protocol):
    name: str

    @property
    def tokenizer(self) -> Any: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def score(self, seqs: list[Seq], token_logprobs: bool = False, progress=None) -> list[SeqResult]: ...


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
