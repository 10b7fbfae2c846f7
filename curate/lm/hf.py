"""transformers backend: the model in this process, on CPU or GPU, through the masked-CE engine."""

from __future__ import annotations

from typing import Any

from curate.lm.base import resolve_device
from curate.lm.engine import EnginePlan, MaskedCE, NextToken, Seq, SeqResult
from curate.models import is_gguf, model_revision, resolve_model
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
            self._resolved = resolve_model(self.params.model, self.params.revision)
        return self._resolved

    def fingerprint(self) -> dict[str, Any]:
        p = self.params
        return {"backend": self.name, "model_id": p.model, "model_revision": model_revision(p.model, p.revision),
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

    def next_token(self, prompts: list[list[int]], candidates: list[int], progress=None) -> list[NextToken]:
        set_torch_threads(self.torch_threads)
        engine = self.engine()
        out = engine.next_token(prompts, candidates, progress=progress)
        self.last_plan = engine.plan
        return out

    def chat(self, conversations: list[list[dict]], decoding: dict, seeds: list[int] | None = None, progress=None,
             prefix: str = "") -> list[dict]:
        """Reply to each conversation (rendered with the model's chat template; a model without one
        gets ``role: content`` lines and an ``assistant:`` cue). ``prefix`` starts the reply; the
        returned text includes it."""
        tok = self.tokenizer
        prompts = []
        for conv in conversations:
            if getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) + prefix
                prompts.append(tok(text, add_special_tokens=False)["input_ids"])
            else:
                text = "\n\n".join(f"{m['role']}: {m['content']}" for m in conv) + "\n\nassistant: " + prefix
                prompts.append(tok(text)["input_ids"])
        out = self.generate(prompts, decoding, seeds, progress)
        for o in out:
            if o["text"] is not None:
                o["text"] = prefix + o["text"]
        return out

    def generate(self, prompts: list[list[int]], decoding: dict, seeds: list[int] | None = None, progress=None) -> list[dict]:
        """Greedy (temperature 0) or sampled continuations of token-id prompts. Sampled rows run one at
        a time with their own seed, so a row's text does not depend on batching or order."""
        import torch

        set_torch_threads(self.torch_threads)
        model, tok = self.model, self.tokenizer
        max_new = int(decoding.get("max_tokens", 128))
        temperature = float(decoding.get("temperature", 0.0))
        eos = model.generation_config.eos_token_id or tok.eos_token_id  # an id or a list of ids
        out = []
        for i, ids in enumerate(prompts):
            kwargs = dict(max_new_tokens=max_new, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                          eos_token_id=eos)
            if temperature > 0:
                torch.manual_seed(int(seeds[i]) if seeds else 0)
                kwargs.update(do_sample=True, temperature=temperature, top_p=float(decoding.get("top_p", 1.0)),
                              top_k=int(decoding.get("top_k", 0)))
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            try:
                with torch.inference_mode():
                    gen = model.generate(input_ids=torch.tensor([ids], device=self.device),
                                         attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device), **kwargs)
                new = gen[0, len(ids):].tolist()
                out.append({"text": tok.decode(new, skip_special_tokens=True), "n_tokens": len(new), "status": "ok"})
            except Exception as exc:  # noqa: BLE001 - a failed row becomes its own status
                out.append({"text": None, "n_tokens": 0, "status": "error", "error_class": type(exc).__name__, "message": str(exc)[:500]})
            if progress is not None:
                progress.advance(1)
        return out
