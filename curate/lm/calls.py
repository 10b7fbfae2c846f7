"""The LLM call engine (methods.md E6e): every reply a rewriter asks a model for goes through here.

``CallEngine(backend, cache_dir, budget).run(calls)`` → one :class:`Reply` per :class:`Call`, in order:

- **one path for every backend**: calls with the same decoding go to ``backend.chat`` together —
  ``hf`` generates them in left-padded batches (per-row seeds for sampled rows), ``vllm`` in one
  ``LLM.chat`` call per chunk, ``openai`` as concurrent requests (bounded, capped retries with backoff and
  jitter on 429/5xx/timeouts; see :mod:`curate.lm.openai`);
- **stop strings**: ``Decoding.stop`` is sent to the backend and the text is also cut at the first
  stop string here (exclusive, as the OpenAI API does), so every backend returns the same text;
- **cache**: each finished reply is written to ``cache_dir`` under the sha256 of (backend
  fingerprint, messages, decoding, seed, and ``attempt`` when it is a deliberate retry) as soon as its batch returns, with its raw
  text, token counts and retries; a re-run or a resumed run reads it and makes no call. Calls go to the backend
  in chunks (``flush_every``), so a killed run loses at most the chunk in flight. Failed calls are
  not cached (the next run tries them again);
- **budget caps** (:class:`Budget`), checked *before* a call is made: ``max_calls``,
  ``max_new_tokens_total`` and ``max_cost`` (prices per million tokens). Within one ``run`` the
  decision uses each call's worst case (its prompt tokens and ``max_tokens``), so a cap is never
  exceeded and the cut falls at the same call whatever the batching; replies of earlier ``run``
  calls count with what they actually used (the server's ``usage`` where it reports one; a reply
  without ``usage`` keeps its worst case and is flagged ``usage_missing``). Cached replies are admitted
  the same way (worst case within the run, what they used afterwards: they were made for this
  output), so a resumed run stops at the same call as an uninterrupted one; what earlier runs of a
  step spent is carried in with :meth:`Spent.carry` (the rewrite stage keeps each finished unit's
  spending in the store). A call that does not fit gets ``status="budget_exhausted"`` and is not
  made (nor read from the cache);
- **prompt tokens** are counted with the backend's tokenizer; a backend without a local tokenizer
  (the ``openai`` backend unless its ``tokenizer`` is set: a hosted model's name is no tokenizer to
  download) gets a deliberately high estimate instead (:func:`prompt_token_bound`: the UTF-8 bytes of
  the messages plus allowances for the template), and the server's ``usage`` replaces it after the
  call; ``Spent.prompt_tokens_estimated`` counts those calls;
- **statuses**: ``ok``; ``truncated`` (the reply hit ``max_tokens``: finish reason ``length``; its text
  is kept for the record and must not be parsed as a complete answer; cached like ``ok``);
  ``error`` (the call failed: transport, HTTP status, retries exhausted, no text; never cached,
  counted in ``Spent.failed`` with the first message in ``Spent.first_error``); ``budget_exhausted``.
- **constrained decoding**: with ``Decoding.constrain`` the call's declared output ``shape`` (see
  :mod:`curate.prompts`) goes to the backend (``chat(..., shapes=[...])``), which enforces it where it
  can and says so per reply (``constrained``).
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
    constrain: bool = Field(False, description="Enforce each prompt's declared output shape (regex / JSON schema) while decoding.")

    def key_fields(self) -> dict[str, Any]:
        """The decoding as it enters a reply's cache key (``constrain`` only when on, so replies
        cached before the option existed keep their keys)."""
        d = self.model_dump(mode="json")
        if not d["constrain"]:
            del d["constrain"]
        return d

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
    max_new_tokens_total: int | None = Field(None, ge=0,
                                             description="Most generated tokens over all calls (a call reserves its max_tokens).")
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
    shape: dict[str, Any] | None = None  # the prompt's declared output shape; sent to the backend when decoding.constrain


@dataclass
class Reply:
    """What came back. ``status``: ok | truncated | error | budget_exhausted (module docstring).
    ``text`` is None unless ok or truncated (a truncated reply's text is cut short: never parse it as
    complete). ``n_prompt_tokens``: the server's count where it reports one, else counted (or estimated,
    ``prompt_tokens_estimated``) only when a budget cap or an input price needs it, else None;
    ``n_tokens`` is what the backend reports it generated (its worst case, ``max_tokens``, when the
    server reported no usage: ``usage_missing``). ``finish_reason``: stop | length | None (unknown)."""

    text: str | None
    status: str
    key: str
    n_prompt_tokens: int | None = None
    n_tokens: int = 0
    retries: int = 0
    cached: bool = False
    error: str | None = None
    raw: str | None = None  # the text before stop strings were applied
    finish_reason: str | None = None
    usage_missing: bool = False
    prompt_tokens_estimated: bool = False
    constrained: bool | None = None  # None: no constraint asked; False: asked, the backend could not enforce it

    @property
    def failed(self) -> bool:
        """The call failed (not a budget refusal, not a reply cut by the token limit)."""
        return self.status == "error"

    def record(self) -> dict[str, Any]:
        """What a derived row keeps of its call (``generation.calls``)."""
        return {k: v for k, v in asdict(self).items() if k != "raw" or v != self.text}


#: what :class:`Spent` counts against the budget caps (carried across runs); the rest is this run's bookkeeping
CHARGED = ("calls", "new_tokens", "prompt_tokens", "cost")


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
    failed: int = 0  # calls that failed (status error); never cached, asked again by the next run
    truncated: int = 0  # replies cut by max_tokens
    usage_missing: int = 0  # replies whose server reported no usage (charged their worst case)
    prompt_tokens_estimated: int = 0  # calls admitted on an estimate of their prompt tokens (no local tokenizer)
    carried: int = 0  # calls charged by earlier runs of the step (see carry)
    first_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def charged(self) -> dict[str, Any]:
        """What counts against the caps, to store beside finished work (see :meth:`carry`)."""
        return {k: getattr(self, k) for k in CHARGED}

    def carry(self, charged: dict[str, Any]) -> None:
        """Add what an earlier run spent on work that is not done again (a stored unit's ``charged``)."""
        for k in CHARGED:
            setattr(self, k, getattr(self, k) + charged.get(k, 0))
        self.carried += int(charged.get("calls", 0))


#: tokens a chat template may add around each message (role markers, separators), on top of its text
MESSAGE_OVERHEAD_TOKENS = 8
#: tokens a chat template or a server may add on its own (a default system prompt: SmolLM2's is 26 tokens)
TEMPLATE_ALLOWANCE_TOKENS = 64


def prompt_token_bound(messages: list[dict[str, Any]]) -> int:
    """A deliberately high estimate of a chat prompt's tokens without its tokenizer: the UTF-8 bytes
    of every message's text (a byte-level BPE token — GPT, Llama 3, Qwen, SmolLM — holds at least one
    byte) plus :data:`MESSAGE_OVERHEAD_TOKENS` per message and :data:`TEMPLATE_ALLOWANCE_TOKENS` for
    what a template adds by itself. Several times the true count for English text, so a budget cap
    admits fewer calls than it could; it bounds the true count unless a server adds more than the
    allowance of its own text. The server's ``usage`` replaces it once the call is answered."""
    return sum(len(str(m.get("content") or "").encode("utf-8")) + MESSAGE_OVERHEAD_TOKENS for m in messages) + TEMPLATE_ALLOWANCE_TOKENS


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
        body = [self.backend_fingerprint, call.messages, call.decoding.key_fields(), call.seed]
        if call.attempt:
            body.append({"attempt": call.attempt})
        if call.decoding.constrain and call.shape is not None:
            body.append({"shape": call.shape})
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

    @property
    def counts_locally(self) -> bool:
        """Whether the backend has a tokenizer here to count prompt tokens (else they are estimated)."""
        return bool(getattr(self.backend, "has_local_tokenizer", True))

    def prompt_tokens(self, call: Call) -> int:
        """Tokens of the rendered prompt with the backend's tokenizer (for the openai backend with a
        ``tokenizer`` set, the local count is an estimate of the server's), or, without a local
        tokenizer, the high estimate :func:`prompt_token_bound`."""
        if not self.counts_locally:
            return prompt_token_bound(call.messages)
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
        reserve: dict[int, tuple[int, int]] = {}
        counted: dict[int, int | None] = {}  # prompt tokens as counted (or estimated) before the call; None: not counted
        hits: list[tuple[int, Reply]] = []
        count = self.capped or bool(self.budget.price_input_per_mtok)
        for i, (call, key) in enumerate(zip(calls, keys)):
            n_prompt = self.prompt_tokens(call) if count else None
            worst = call.decoding.max_tokens
            if not self._fits(n_prompt or 0, worst):
                self.spent.refused += 1
                out[i] = Reply(None, "budget_exhausted", key, error="a budget cap would be exceeded by this call")
                continue
            self._charge(n_prompt or 0, worst)  # worst case now; the actual count replaces it below
            reserve[i] = (n_prompt or 0, worst)
            counted[i] = n_prompt
            self.spent.prompt_tokens_estimated += count and not self.counts_locally
            hit = self._cached(key)  # only an admitted call reads the cache
            if hit is not None:
                self.spent.cache_hits += 1
                hits.append((i, hit))
                out[i] = hit
            else:
                todo.append(i)
        for i, hit in hits:  # admission is decided: cached replies count with what they used
            self._settle(reserve[i], hit, count)
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
                extra = {"shapes": [calls[i].shape for i in idx]} if decoding.constrain else {}
                replies = self.backend.chat([calls[i].messages for i in idx], decoding.request(), seeds=seeds, progress=progress, **extra)
                for i, r in zip(idx, replies):
                    reply = self._reply(keys[i], r, decoding, counted[i])
                    if reply.status in ("ok", "truncated"):
                        self._store(reply)
                    self._settle(reserve[i], reply, count)
                    self.spent.made += 1
                    out[i] = reply
        return out  # type: ignore[return-value]

    def _reply(self, key: str, r: dict[str, Any], decoding: Decoding, n_prompt: int | None) -> Reply:
        """A :class:`Reply` from one row of a backend's ``chat`` (see the module docstring for statuses)."""
        text, status, finish = r.get("text"), r.get("status", "ok"), r.get("finish_reason")
        if status == "ok" and text is None:
            status = "error"
        if status == "ok" and finish == "length":
            status = "truncated"
        usage_missing = r.get("n_tokens") is None and status != "error"
        n_new = decoding.max_tokens if usage_missing else int(r.get("n_tokens") or 0)
        served_prompt = r.get("n_prompt_tokens")
        estimated = not self.counts_locally and n_prompt is not None and served_prompt is None
        reply = Reply(None, status, key, served_prompt if served_prompt is not None else n_prompt, n_new, int(r.get("retries", 0) or 0),
                      error=r.get("message") if status == "error" else None, finish_reason=finish, usage_missing=usage_missing,
                      prompt_tokens_estimated=estimated, constrained=r.get("constrained", True) if decoding.constrain else None)
        if status == "error" and reply.error is None:
            reply.error = r.get("error_class") or "the backend returned no text"
        if status in ("ok", "truncated"):
            reply.raw = text
            reply.text = cut_at_stop(text, decoding.stop)
        return reply

    def _settle(self, reserved: tuple[int, int], reply: Reply, counting: bool) -> None:
        """Replace a call's reserved worst case by what it used: the tokens it generated (its worst
        case when the server reported no usage) and, when prompt tokens are counted, the server's
        count of them where there is one."""
        s, (n_prompt, worst) = self.spent, reserved
        used_prompt = reply.n_prompt_tokens if counting and reply.n_prompt_tokens is not None else n_prompt
        s.new_tokens += reply.n_tokens - worst
        s.prompt_tokens += used_prompt - n_prompt
        s.cost += self.budget.cost(used_prompt - n_prompt, reply.n_tokens - worst)
        if reply.status == "error":
            s.failed += 1
            s.first_error = s.first_error or reply.error
        s.truncated += reply.status == "truncated"
        s.usage_missing += reply.usage_missing
