"""vLLM in-process backend: ``vllm.LLM`` with ``prompt_logprobs`` and ``max_tokens=1`` (teacher
forcing: the log-probability of every actual prompt token; the first position has none).

vLLM is never a dependency of curate (it pins torch and fastapi versions that conflict with Prefect
3.8): install it in a GPU environment of its own, or serve the model with ``vllm serve`` and use the
``openai`` backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from curate.errors import MissingDependency
from curate.lm.base import resolve_dtype
from curate.lm.engine import Seq, SeqResult
from curate.lm.spec import LMParams
from curate.models import cached, is_adapter, merged_model_dir, model_revision, resolve_model


def _vllm():
    try:
        import vllm
    except ImportError:
        raise MissingDependency("the 'vllm' backend", "vllm",
                                "pip install vllm  (in its own environment: it cannot share one with prefect 3.8; "
                                "or run `vllm serve MODEL` and use backend: openai with base_url)") from None
    return vllm


class VLLMBackend:
    name = "vllm"

    def __init__(self, params: LMParams, torch_threads: int | None = None):
        self.params = params
        self._vllm = _vllm()
        self._dtype: tuple[str, str] | None = None

    @property
    def dtype_choice(self) -> tuple[str, str]:
        """(weights dtype, why): ``dtype: auto`` resolved once (:func:`~curate.lm.base.resolve_dtype`; vLLM runs on the GPU)."""
        if self._dtype is None:
            self._dtype = resolve_dtype(self.params.dtype, "cuda")
        return self._dtype

    def fingerprint(self) -> dict[str, Any]:
        p = self.params
        return {"backend": self.name, "model_id": p.model, "model_revision": model_revision(p.model, p.revision),
                "tokenizer_id": p.tokenizer or p.model, "dtype": self.dtype_choice[0], "quantization": None}

    @property
    def llm(self):
        p = self.params
        r = resolve_model(p.model, p.revision)
        dtype = self.dtype_choice[0]

        def load():
            location = merged_model_dir(r.location) if is_adapter(r.location) else r.location  # a LoRA adapter from curate train
            return self._vllm.LLM(model=location, tokenizer=p.tokenizer or location, dtype=dtype, trust_remote_code=p.trust_remote_code,
                                  revision=p.revision if r.source == "hub" else None, enable_prefix_caching=True)

        return cached(("vllm", r.location, r.revision, dtype), load)

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    def score(self, seqs: list[Seq], token_logprobs: bool = False, progress=None) -> list[SeqResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s.ids) for s in seqs], params, use_tqdm=False)
        results = []
        for s, out in zip(seqs, outs):
            lps = np.array([np.nan] + [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], s.ids[1:])], dtype=np.float64)
            results.append(spans_from_token_logprobs(s, lps, token_logprobs))
            if progress is not None:
                progress.advance(1)
        return results


    def next_token(self, prompts: list[list[int]], candidates: list[int], progress=None):
        """Log-probabilities of the candidates among the top 20 next tokens; a candidate outside them
        makes the row ``fallback_needed`` (never a substituted value)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from curate.lm.engine import NextToken

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        res = []
        for out in outs:
            top = out.outputs[0].logprobs[0]
            vals = np.array([top[c].logprob if c in top else np.nan for c in candidates], dtype=np.float64)
            res.append(NextToken(vals, 0.0, "ok" if np.isfinite(vals).all() else "fallback_needed"))
        return res

    def chat(self, conversations: list[list[dict]], decoding: dict, seeds: list[int] | None = None, progress=None,
             prefix: str = "", shapes: list[dict | None] | None = None) -> list[dict]:
        """Reply to each conversation with ``LLM.chat``. ``shapes`` (one per conversation; None: free text)
        go to vLLM's structured outputs (:func:`curate.lm.shapes.sampling_constraint`); with a ``prefix``
        they are not sent (vLLM's grammar would begin after the prefix, which is the start of the shape)
        and those rows say ``constrained: False``."""
        import vllm.sampling_params as vsp
        from vllm import SamplingParams

        from curate.lm.shapes import sampling_constraint

        if prefix:  # the reply starts with the prefix: continue a final assistant message
            conversations = [conv + [{"role": "assistant", "content": prefix}] for conv in conversations]
        params = [SamplingParams(max_tokens=int(decoding.get("max_tokens", 128)), temperature=float(decoding.get("temperature", 0.0)),
                                 top_p=float(decoding.get("top_p", 1.0)), top_k=int(decoding.get("top_k", 0)) or -1,
                                 seed=None if seeds is None else int(seeds[i]), stop=list(decoding.get("stop") or []) or None,
                                 **(sampling_constraint(vsp, shapes[i]) if shapes and shapes[i] is not None and not prefix else {}))
                  for i in range(len(conversations))]
        kw = {"add_generation_prompt": False, "continue_final_message": True} if prefix else {}
        outs = self.llm.chat(conversations, params, use_tqdm=False, **kw)
        # vLLM's finish_reason: "stop" (EOS or a stop string) or "length" (max_tokens reached)
        rows = [{"text": prefix + o.outputs[0].text, "n_tokens": len(o.outputs[0].token_ids), "status": "ok",
                 "finish_reason": o.outputs[0].finish_reason} for o in outs]
        if shapes is not None:
            for row, shape in zip(rows, shapes):
                row["constrained"] = None if shape is None else not prefix
        return rows


def spans_from_token_logprobs(seq: Seq, lps: np.ndarray, keep: bool) -> SeqResult:
    """Reduce per-position log-probabilities (index = position) to the sequence's spans."""
    nll, n, tl = [], [], []
    for a, b in seq.spans:
        part = lps[a:b]
        nll.append(float(-part.sum()))
        n.append(b - a)
        tl.append(part.astype(np.float32))
    return SeqResult(nll, n, token_logprobs=tl if keep else None)
