"""The LLM call engine (methods.md E6e): every reply a rewriter asks a model for goes through here.

``CallEngine(backend, cache_dir, budget).run(calls)`` → one :class:`Reply` per :class:`Call`, in order:

- **one path for every backend**: calls with the same decoding go to ``backend.chat`` together —
  ``hf`` generates them in left-padded batches (per-row seeds for sampled rows), ``vllm`` in one
  ``LLM.chat`` call per chunk, ``openai`` as concurrent requests (bounded, capped retries with backoff and
  jitter on 429/5xx/timeouts; see :mod:`curate.lm.openai`);
- **stop strings**: ``Decoding.stop`` is sent to the backend and the text is also cut at the first
  stop string here (exclusive, as the OpenAI API does), so every backend returns the same text;
- **cache**: each finished reply is written to ``cache_dir`` under the sha256 of (backend
  fingerprint, messages, decoding, seed, and ``attempt`` when it is a deliberate retry) as soon as its batch returns, with its raw text, token
  counts and retries; a re-run or a resumed run reads it and makes no call. Calls go to the backend
  in chunks (``flush_every``), so a killed run loses at most the chunk in flight. Failed calls are
  not cached (the next run tries them again);
- **budget caps** (:class:`Budget`), checked *before* a call is made: ``max_calls``,
  ``max_new_tokens_total`` and ``max_cost`` (prices per million tokens). Within one ``run`` the
  decision uses each call's worst case (its prompt tokens and ``max_tokens``), so a cap is never
  exceeded and the cut falls at the same call whatever the batching; replies of earlier ``run``
  calls count with what they actually used. Cached replies are admitted the same way (worst case
  within the run, what they used afterwards: they were made for this output), so a resumed run
  stops at the same call as an uninterrupted one. A call that does not fit gets
  ``status="budget_exhausted"`` and is not made (nor read from the cache).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Decoding(BaseModel):
    """How a reply is generated. ``temperature`` 0 is greedy; ``seed`` per call comes from the caller."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, gt=0, description="Most new tokens per reply.")
    stop: tuple[str, ...] = Field((), description="The reply ends before the first of these strings.")

    def request(self) -> dict[str, Any]:
        """The decoding as the backends' ``chat`` reads it."""
        d: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.stop:
            d["stop"] = list(self.stop)
        return d


class Budget(BaseModel):
    """Caps on what one step may spend; ``None`` = no cap. Prices are per million tokens."""

    model_config = ConfigDict(extra="forbid")

    max_calls: int | None = Field(None, ge=0, description="Most model calls (cached replies count: they were made for this output).")
    max_new_tokens_total: int | None = Field(None, ge=0, description="Most generated tokens over all calls (a call reserves its max_tokens).")
    max_cost: float | None = Field(None, ge=0, description="Most money, from the token prices below.")
    price_input_per_mtok: float = Field(0.0, ge=0, description="Price of a million prompt tokens.")
    price_output_per_mtok: float = Field(0.0, ge=0, description="Price of a million generated tokens.")

    def cost(self, n_prompt: int, n_new: int) -> float:
        return (n_prompt * self.price_input_per_mtok + n_new * self.price_output_per_mtok) / 1e6


@dataclass
class Call:
    """One request: chat ``messages`` (canonical roles), the prompt's ref ({id, version, hash}), decoding, seed."""

    messages: list[dict[str, Any]]
    prompt: dict[str, str]
    decoding: Decoding
    seed: int | None = None
    attempt: int = 0  # > 0: a deliberate retry of the same prompt (e.g. after a parse failure); its own cache entry


@dataclass
class Reply:
    """What came back. ``status``: ok | error | budget_exhausted. ``text`` is None unless ok.
    ``n_prompt_tokens`` is counted (backend tokenizer) only when a budget cap or an input price needs
    it, else None; ``n_tokens`` is what the backend reports it generated."""

    text: str | None
    status: str
    key: str
    n_prompt_tokens: int | None = None
    n_tokens: int = 0
    retries: int = 0
    cached: bool = False
    error: str | None = None
    raw: str | None = None  # the text before stop strings were applied

    def record(self) -> dict[str, Any]:
        """What a derived row keeps of its call (``generation.calls``)."""
        return {k: v for k, v in asdict(self).items() if k != "raw" or v != self.text}


@dataclass
class Spent:
    """What an engine has spent; ``prompt_tokens`` and prompt cost count only when a cap or a price
    makes the engine count prompt tokens."""

    calls: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    cost: float = 0.0
    made: int = 0  # calls sent to the model by this engine (not cached)
    cache_hits: int = 0
    refused: int = 0  # calls refused by a cap

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


@dataclass
class CallEngine:
    """Runs :class:`Call`\\ s on one backend with a reply cache and a :class:`Budget` (see module docstring)."""

    backend: Any
    cache_dir: Path | None = None
    budget: Budget = field(default_factory=Budget)
    spent: Spent = field(default_factory=Spent)
    #: calls per backend request batch, cached as each returns (a kill loses at most one chunk);
    #: None: 64, or 1024 for vllm (whose throughput needs large batches)
    flush_every: int | None = None

    def __post_init__(self):
        self.cache_dir = Path(self.cache_dir) if self.cache_dir is not None else None
        self.backend_fingerprint = self.backend.fingerprint()

    # -- keys and cache ---------------------------------------------------------------------------
    def key(self, call: Call) -> str:
        body = [self.backend_fingerprint, call.messages, call.decoding.model_dump(mode="json"), call.seed]
        if call.attempt:
            body.append({"attempt": call.attempt})
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cached(self, key: str) -> Reply | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return Reply(**{**data, "cached": True})

    def _store(self, reply: Reply) -> None:
        path = self._path(reply.key)
        if path is not None:
            from curate.io import write_json

            write_json(path, {k: v for k, v in asdict(reply).items() if k != "cached"})

    def prompt_tokens(self, call: Call) -> int:
        """Tokens of the rendered prompt with the backend's tokenizer (for the openai backend the local
        tokenizer's count is an estimate of the server's)."""
        from curate.lm.hf import chat_prompt_ids

        return len(chat_prompt_ids(self.backend.tokenizer, call.messages))

    # -- the budget -------------------------------------------------------------------------------
    def _fits(self, n_prompt: int, n_new: int) -> bool:
        b, s = self.budget, self.spent
        if b.max_calls is not None and s.calls + 1 > b.max_calls:
            return False
        if b.max_new_tokens_total is not None and s.new_tokens + n_new > b.max_new_tokens_total:
            return False
        return b.max_cost is None or s.cost + b.cost(n_prompt, n_new) <= b.max_cost + 1e-12

    def _charge(self, n_prompt: int, n_new: int) -> None:
        s = self.spent
        s.calls += 1
        s.new_tokens += n_new
        s.prompt_tokens += n_prompt
        s.cost += self.budget.cost(n_prompt, n_new)

    @property
    def capped(self) -> bool:
        b = self.budget
        return b.max_calls is not None or b.max_new_tokens_total is not None or b.max_cost is not None

    # -- running ----------------------------------------------------------------------------------
    def run(self, calls: list[Call], progress=None) -> list[Reply]:
        """One reply per call, in order. Every call, cached or not, is admitted by the budget with its
        worst case (so the cut falls at the same call whether or not earlier replies are cached); the
        cached ones are read, the rest are made (grouped by decoding, in chunks of
        :attr:`flush_every` calls) and cached as each chunk returns."""
        keys = [self.key(c) for c in calls]
        out: list[Reply | None] = [None] * len(calls)
        todo: list[int] = []
        reserve: dict[int, tuple[int | None, int]] = {}
        hits: list[tuple[int, Reply]] = []
        for i, (call, key) in enumerate(zip(calls, keys)):
            n_prompt = self.prompt_tokens(call) if self.capped or self.budget.price_input_per_mtok else None
            worst = call.decoding.max_tokens
            if not self._fits(n_prompt or 0, worst):
                self.spent.refused += 1
                out[i] = Reply(None, "budget_exhausted", key, error="a budget cap would be exceeded by this call")
                continue
            self._charge(n_prompt or 0, worst)  # worst case now; the actual count replaces it below
            reserve[i] = (n_prompt, worst)
            hit = self._cached(key)  # only an admitted call reads the cache
            if hit is not None:
                self.spent.cache_hits += 1
                hits.append((i, hit))
                out[i] = hit
            else:
                todo.append(i)
        for i, hit in hits:  # admission is decided: cached replies count with what they used
            self._settle(reserve[i], hit.n_tokens)
        if progress is not None:
            progress.advance(len(calls) - len(todo))
        groups: dict[tuple, list[int]] = {}
        for i in todo:
            groups.setdefault((calls[i].decoding, calls[i].seed is None), []).append(i)
        chunk = self.flush_every or {"vllm": 1024}.get(getattr(self.backend, "name", ""), 64)
        for (decoding, _), members in groups.items():
            # longest conversations first, so a chunk holds prompts of similar length (hf pads less)
            members = sorted(members, key=lambda i: -len(json.dumps(calls[i].messages, ensure_ascii=False)))
            for at in range(0, len(members), chunk):
                idx = members[at:at + chunk]
                seeds = None if calls[idx[0]].seed is None else [calls[i].seed for i in idx]
                replies = self.backend.chat([calls[i].messages for i in idx], decoding.request(), seeds=seeds, progress=progress)
                for i, r in zip(idx, replies):
                    text, status = r.get("text"), r.get("status", "ok")
                    n_new = int(r.get("n_tokens") or 0)
                    reply = Reply(None, status if status != "ok" or text is not None else "error", keys[i], reserve[i][0], n_new,
                                  int(r.get("retries", 0) or 0), error=r.get("message"))
                    if reply.status == "ok":
                        reply.raw = text
                        reply.text = cut_at_stop(text, decoding.stop)
                        self._store(reply)
                    self._settle(reserve[i], n_new)
                    self.spent.made += 1
                    out[i] = reply
        return out  # type: ignore[return-value]

    def _settle(self, reserved: tuple[int | None, int], n_new: int) -> None:
        """Replace a call's reserved worst case by the tokens it actually generated."""
        worst = reserved[1]
        self.spent.new_tokens += n_new - worst
        self.spent.cost += self.budget.cost(0, n_new - worst)
