"""OpenAI-compatible endpoint backend (``vllm serve``, llama.cpp's server, hosted APIs).

- scoring: ``POST /completions`` with the token ids as the prompt, ``echo: true``, ``logprobs: 1``
  and ``max_tokens: 1`` — the server returns the log-probability of every prompt token (the first
  has none); spans are reduced here exactly as the local engine does;
- chat (judges, rewriting): ``POST /chat/completions``.

``server`` says what answers: ``openai`` (default) is the plain OpenAI API — a hosted API refuses
fields it does not know, so only documented ones are sent (``top_k`` is left out, with a warning,
and an ``answer_prefix`` is refused); ``vllm`` is a ``vllm serve`` endpoint, which also gets vLLM's
extensions: ``top_k`` and, to continue an answer prefix, ``add_generation_prompt: false`` with
``continue_final_message: true``.

Requests run concurrently (``concurrency`` in flight), retry with exponential backoff and jitter on
429, 5xx and connection errors only (never on other 4xx), and are cached on disk by
(endpoint, model, request body hash): a re-run sends nothing it already has. The API key is read
from the environment variable named by ``api_key_env`` and never logged or cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import CurateError
from curate.lm.engine import Seq, SeqResult
from curate.lm.spec import LMParams
from curate.lm.vllm import spans_from_token_logprobs

RETRY_STATUS = {429, 500, 502, 503, 504}
#: decoding keys only vLLM's server understands (sampling extensions), left out for ``server: openai``
VLLM_SAMPLING_EXTENSIONS = ("top_k",)


class RequestError(RuntimeError):
    def __init__(self, status: int | None, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class OpenAIBackend:
    name = "openai"

    def __init__(self, params: LMParams, torch_threads: int | None = None, cache_dir: str | Path | None = None):
        if not params.base_url:
            raise CurateError("backend: openai needs base_url (e.g. http://127.0.0.1:8000/v1)")
        self.params = params
        self.base_url = params.base_url.rstrip("/")
        from curate.io import location

        self.cache_dir = location(cache_dir) if cache_dir else None  # a local folder, or a URL store's requests/
        self.requests_sent = 0
        self.cache_hits = 0
        self._warned: set[str] = set()
        self._local = None  # the HFBackend that holds the local tokenizer (built on first use)

    def fingerprint(self) -> dict[str, Any]:
        p = self.params
        return {"backend": self.name, "server": p.server, "endpoint": self.base_url, "model_id": p.served_name or p.model,
                "model_revision": p.revision or "served", "tokenizer_id": p.tokenizer or p.model, "dtype": "server", "quantization": None}

    @property
    def has_local_tokenizer(self) -> bool:
        """Only a ``tokenizer`` set in the params is loaded here: a served model's name (``gpt-4o-mini``)
        is no tokenizer to download, so the call engine estimates prompt tokens instead and reads the
        server's ``usage``."""
        return bool(self.params.tokenizer)

    @property
    def tokenizer(self):
        if self._local is None:  # once: its model resolution is kept (the call engine asks per call)
            from curate.lm.hf import HFBackend

            p = self.params
            self._local = HFBackend(p.model_copy(update={"model": p.tokenizer or p.model, "tokenizer": None}))
        return self._local.tokenizer

    # -- HTTP -------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.params.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _cache_path(self, path: str, body: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(json.dumps([self.base_url, path, body], sort_keys=True).encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    async def _post(self, client, sem, path: str, body: dict, attempts: list[int] | None = None) -> dict:
        """The response to one request (retried as the module docstring says); ``attempts`` gets
        the number of requests sent for it."""
        cache = self._cache_path(path, body)
        if cache is not None and cache.exists():
            self.cache_hits += 1
            return json.loads(cache.read_text())
        p = self.params
        delay = 0.5
        for attempt in range(p.max_retries + 1):
            async with sem:
                try:
                    self.requests_sent += 1
                    if attempts is not None:
                        attempts[0] = attempt + 1
                    resp = await client.post(f"{self.base_url}{path}", json=body, headers=self._headers())
                    status, text = resp.status_code, resp.text
                except Exception as exc:  # connection reset, timeout: transient
                    status, text = None, f"{type(exc).__name__}: {exc}"
            if status == 200:
                data = json.loads(text)
                if cache is not None:
                    from curate.io import write_json

                    write_json(cache, data)
                return data
            if status is not None and status not in RETRY_STATUS:
                raise RequestError(status, text[:300])
            if attempt == p.max_retries:
                raise RequestError(status, f"gave up after {attempt + 1} attempts: {text[:300]}")
            await asyncio.sleep(min(30.0, delay) * (0.5 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    def _run_all(self, path: str, bodies: list[dict], progress=None, attempts: list[list[int]] | None = None) -> list[dict | Exception]:
        """Every request, ``concurrency`` in flight; a request that fails for good is its exception.
        ``attempts[i][0]`` gets the number of requests sent for body i."""
        import httpx

        async def main():
            sem = asyncio.Semaphore(self.params.concurrency)
            async with httpx.AsyncClient(timeout=self.params.timeout_s) as client:
                async def one(k, body):
                    try:
                        return await self._post(client, sem, path, body, None if attempts is None else attempts[k])
                    except Exception as exc:  # noqa: BLE001 - becomes this row's status
                        return exc
                    finally:
                        if progress is not None:
                            progress.advance(1)

                return await asyncio.gather(*(one(k, b) for k, b in enumerate(bodies)))

        return asyncio.run(main())

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, seqs: list[Seq], token_logprobs: bool = False, progress=None) -> list[SeqResult]:
        model = self.params.served_name or self.params.model
        bodies = [{"model": model, "prompt": s.ids, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1} for s in seqs]
        out = []
        for s, resp in zip(seqs, self._run_all("/completions", bodies, progress)):
            if isinstance(resp, Exception):
                out.append(SeqResult([float("nan")] * len(s.spans), [0] * len(s.spans), "error", type(resp).__name__, str(resp)[:500]))
                continue
            try:
                lps = prompt_logprobs(resp, s.ids)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                out.append(SeqResult([float("nan")] * len(s.spans), [0] * len(s.spans), "error", "BadResponse", str(exc)[:500]))
                continue
            out.append(spans_from_token_logprobs(s, lps, token_logprobs))
        return out

    def next_token(self, prompts: list[list[int]], candidates: list[int], progress=None):
        """Log-probabilities of the candidates among the top 20 next tokens (``logprobs: 20``); a
        candidate outside them makes the row ``fallback_needed``."""
        from curate.lm.engine import NextToken

        model = self.params.served_name or self.params.model
        names = [self.tokenizer.decode([c]) for c in candidates]
        bodies = [{"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": 20} for ids in prompts]
        out = []
        for resp in self._run_all("/completions", bodies, progress):
            if isinstance(resp, Exception):
                out.append(NextToken(np.full(len(candidates), np.nan), float("nan"), "error", type(resp).__name__, str(resp)[:500]))
                continue
            top = resp["choices"][0]["logprobs"]["top_logprobs"][0]
            vals = np.array([top.get(n, np.nan) for n in names], dtype=np.float64)
            out.append(NextToken(vals, 0.0, "ok" if np.isfinite(vals).all() else "fallback_needed"))
        return out

    # -- chat -------------------------------------------------------------------------------------
    def _request_decoding(self, decoding: dict[str, Any] | None) -> dict[str, Any]:
        """The decoding fields this server accepts: vLLM's sampling extensions only for ``server: vllm``."""
        d = dict(decoding or {})
        if self.params.server == "vllm":
            return d
        for key in VLLM_SAMPLING_EXTENSIONS:
            value = d.pop(key, None)
            if value and key not in self._warned:  # top_k 0 means "off": nothing is lost
                self._warned.add(key)
                logging.getLogger("curate").warning(
                    f"openai backend: {key}={value} is a vLLM extension and is not sent to {self.base_url} "
                    "(server: openai); set server: vllm for a `vllm serve` endpoint")
        return d

    def chat(self, conversations: list[list[dict]], decoding: dict[str, Any] | None = None, seeds: list[int] | None = None,
             progress=None, prefix: str = "", shapes: list[dict | None] | None = None) -> list[dict]:
        """One chat completion per conversation: ``{"text", "status", …}`` per row. A ``prefix`` is sent
        as a final assistant message to continue (vLLM's ``continue_final_message``; ``server: vllm``
        only — the plain OpenAI API has no way to continue a message).

        ``shapes`` (one per conversation; None: free text) are asked for where this server can enforce
        them (:func:`curate.lm.shapes.request_fields`: ``response_format`` for a JSON schema, vLLM's
        ``structured_outputs`` for a regex with ``server: vllm``; nothing with a ``prefix``, which the
        server's grammar would not include); a request refused with 400 or 422 is sent again without
        those fields. Each shaped row says ``constrained``: the shape was asked for and the reply has
        it (:func:`curate.lm.shapes.conforms`; a server that ignores the field is not taken at its word)."""
        from curate.lm.shapes import conforms, request_fields

        if prefix and self.params.server != "vllm":
            raise CurateError(f"openai backend: an answer prefix ({prefix!r}) needs vLLM's continue_final_message, which the "
                              "plain OpenAI API does not have: set server: vllm for a `vllm serve` endpoint, or leave answer_prefix empty")
        model = self.params.served_name or self.params.model
        d = self._request_decoding(decoding)
        asked = [request_fields(s, self.params.server) if shapes is not None and not prefix else None
                 for s in (shapes or [None] * len(conversations))]
        bodies = []
        for i, conv in enumerate(conversations):
            body = {"model": model, "messages": conv, **d, **(asked[i] or {})}
            if prefix:
                body.update(messages=conv + [{"role": "assistant", "content": prefix}], add_generation_prompt=False,
                            continue_final_message=True)
            if seeds is not None:
                body["seed"] = int(seeds[i])
            bodies.append(body)
        out = []
        attempts = [[0] for _ in bodies]
        results = self._run_all("/chat/completions", bodies, progress, attempts)
        refused = [k for k, r in enumerate(results) if asked[k] and isinstance(r, RequestError) and r.status in (400, 422)]
        if refused:  # the server does not take the constraint fields: ask again without them (free, recorded)
            if "constrain" not in self._warned:
                self._warned.add("constrain")
                logging.getLogger("curate").warning(f"openai backend: {self.base_url} refused the output-shape fields "
                                                    f"({str(results[refused[0]])[:200]}); those replies are unconstrained")
            more = [[0] for _ in refused]
            plain = [{f: v for f, v in bodies[k].items() if f not in asked[k]} for k in refused]
            for k, r, tries in zip(refused, self._run_all("/chat/completions", plain, None, more), more):
                results[k], asked[k] = r, None
                attempts[k][0] += tries[0]
        for k, (resp, tries) in enumerate(zip(results, attempts)):
            retries = max(tries[0] - 1, 0)
            if isinstance(resp, Exception):
                row = {"text": None, "status": "error", "error_class": type(resp).__name__, "message": str(resp)[:500], "retries": retries}
            else:
                row = chat_row(resp, prefix, retries)
            if shapes is not None:
                shape = shapes[k]
                row["constrained"] = None if shape is None else bool(asked[k]) and row["status"] == "ok" and conforms(shape, row["text"])
            out.append(row)
        return out


def chat_row(resp: dict, prefix: str = "", retries: int = 0) -> dict:
    """One chat-completions response as the call engine reads it: ``text`` (``prefix`` + content),
    ``status``, ``finish_reason``, ``n_tokens`` and ``n_prompt_tokens`` from ``usage`` (None when the
    server reports none: the engine flags the reply and charges its worst case). A response without
    a choice or with ``content: null`` (a refusal, a tool call, a filtered reply) is this row's error."""
    usage = resp.get("usage") or {}
    row: dict[str, Any] = {"retries": retries, "n_tokens": usage.get("completion_tokens"), "n_prompt_tokens": usage.get("prompt_tokens")}
    choices = resp.get("choices") or []
    message = (choices[0].get("message") or {}) if choices else {}
    content = message.get("content")
    finish = choices[0].get("finish_reason") if choices else None
    if not isinstance(content, str):
        why = "no choices" if not choices else f"content is {type(content).__name__}" + (
            f" (refusal: {str(message['refusal'])[:200]})" if message.get("refusal") else "")
        return {**row, "text": None, "status": "error", "error_class": "EmptyReply", "finish_reason": finish,
                "message": f"the server's reply has no text: {why}; finish_reason {finish!r}"}
    return {**row, "text": prefix + content, "status": "ok", "finish_reason": finish}


def prompt_logprobs(resp: dict, ids: list[int]) -> np.ndarray:
    """Per-position log-probabilities of the prompt tokens from a completions response.

    Accepts ``choices[0].prompt_logprobs`` (vLLM: a list of {token_id: {logprob}} dicts) or
    ``choices[0].logprobs.token_logprobs`` with ``echo`` (OpenAI legacy format; the first is null).
    """
    n_prompt = len(ids)
    choice = resp["choices"][0]
    if choice.get("prompt_logprobs"):  # vLLM: one {token_id: {"logprob", "rank", …}} per position
        vals = [np.nan]
        for d, t in zip(choice["prompt_logprobs"][1:n_prompt], ids[1:]):
            vals.append(float(d[str(t)]["logprob"]))
        return np.asarray(vals, dtype=np.float64)
    tl = choice["logprobs"]["token_logprobs"]
    if len(tl) < n_prompt:
        raise ValueError(f"the server returned {len(tl)} prompt log-probs for {n_prompt} tokens (does it support echo?)")
    return np.asarray([np.nan if v is None else float(v) for v in tl[:n_prompt]], dtype=np.float64)
