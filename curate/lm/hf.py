"""transformers backend: the model in this process, on CPU or GPU, through the masked-CE engine."""

from __future__ import annotations

from typing import Any

from curate.lm.base import resolve_device
from curate.lm.engine import EnginePlan, MaskedCE, Seq, SeqResult
from curate.lm.resolve import is_gguf, lm_revision, resolve_lm
from curate.lm.spec import LMParams
from curate.models import cached, set_torch_threads


class HFBackend:
    name = "hf"

    def __init__(self, params: LMParams, torch_threads: int | None = None):
        self.params = params
        self.torch_threads = torch_threads
        self._resolved = None
        self.last_plan: EnginePlan | None = None

    @property
    def resolved(self):
        if self._resolved is None:
            self._resolved = resolve_lm(self.params.model, self.params.revision)
        return self._resolved

    def fingerprint(self) -> dict[str, Any]:
        p = self.params
        return {"backend": self.name, "model_id": p.model, "model_revision": lm_revision(p.model, p.revision),
                "tokenizer_id": p.tokenizer or p.model, "dtype": p.dtype, "quantization": "gguf-dequantized-fp32" if is_gguf(p.model) else None}

    @property
    def tokenizer(self):
        from transformers import AutoTokenizer

        r = self.resolved
        where = self.params.tokenizer or r.location
        return cached(("lm-tokenizer", where, r.revision), lambda: AutoTokenizer.from_pretrained(
            where, trust_remote_code=self.params.trust_remote_code, revision=self.params.revision if r.source == "hub" else None))

    @property
    def device(self) -> str:
        return resolve_device(self.params.device)

    @property
    def model(self):
        import torch
        from transformers import AutoModelForCausalLM

        r, p = self.resolved, self.params
        set_torch_threads(self.torch_threads)

        def load():
            m = AutoModelForCausalLM.from_pretrained(r.location, dtype=getattr(torch, p.dtype), trust_remote_code=p.trust_remote_code,
                                                     revision=p.revision if r.source == "hub" else None)
            return m.to(self.device).eval()

        return cached(("lm", r.location, r.revision, p.dtype, self.device, p.trust_remote_code), load)

    def engine(self) -> MaskedCE:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        budget = self.params.max_tokens_per_batch or (2048 if self.device == "cpu" else 16384)
        return MaskedCE.for_model(self.model, pad, self.device, budget)

    def score(self, seqs: list[Seq], token_logprobs: bool = False, progress=None) -> list[SeqResult]:
        set_torch_threads(self.torch_threads)
        engine = self.engine()
        out = engine.score(seqs, token_logprobs=token_logprobs, progress=progress)
        self.last_plan = engine.plan
        return out
