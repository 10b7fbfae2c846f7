"""The backend contract: one small interface over transformers, vLLM and OpenAI-compatible servers.

Every backend (``hf.py``, ``vllm.py``, ``openai.py``) implements all of it:

- ``name``, ``fingerprint()``: what enters the score key (backend, model id, revision, dtype,
  quantization; the openai backend adds the endpoint and server kind), computed without loading weights;
- ``tokenizer``: the model's tokenizer (spans are found with it, on this side, for every backend);
- ``score(seqs)``: masked token log-probabilities (IFD family, perplexity, DELIFT);
- ``next_token(prompts, candidates)``: the candidate tokens' scores after each prompt, with the
  full-vocabulary log-sum-exp (rating-token judges: deita, SelectIT);
- ``chat(conversations, decoding, seeds, prefix)``: one reply per conversation, rendered with the
  model's chat template, ``{"text", "status", …}`` per row (generative judges: LLM rating, DS2).

``hf`` also offers ``generate(prompt_ids, decoding, seeds)`` (batched greedy generation, per-row seeds
for sampled rows), which its ``chat`` uses.
"""

from __future__ import annotations

from typing import Any, Protocol

from curate.lm.engine import NextToken, Seq, SeqResult


class Backend(Protocol):
    name: str

    @property
    def tokenizer(self) -> Any: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def score(self, seqs: list[Seq], token_logprobs: bool = False, progress=None) -> list[SeqResult]: ...

    def next_token(self, prompts: list[list[int]], candidates: list[int], progress=None) -> list[NextToken]: ...

    def chat(self, conversations: list[list[dict]], decoding: dict[str, Any], seeds: list[int] | None = None, progress=None,
             prefix: str = "") -> list[dict]: ...


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
