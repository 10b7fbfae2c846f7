"""Shared machinery of the loss-based scorers (IFD, Superfiltering, r-IFD, perplexity).

A subclass turns each record into *turn jobs* — for every scored turn a conditioned part and, for
ratio scores, a direct part, each a token sequence with the span to score — and combines the per-span
losses into a :class:`~curate.scorers.base.Score`. This module does the rest: template rendering,
tokenization (each distinct text once), locating spans (methods.md A1: ``prefix_len`` re-tokenizes
the text before the span, ``offsets`` uses the offset mapping), the truncation policy (E4:
``equal_span`` scores exactly the same response tokens in both passes), multi-turn policy (E3),
and one pooled call to the backend for every sequence of the batch.

Parts become *passes* (:func:`plan_passes`): the parts of a row whose token ids are a prefix of
another part's share that part's forward, as extra target spans. A causal LM's log-probability at a
position depends only on the tokens before it, so this changes no value (up to kernel numerics), and
with ``context: history`` every reply of a conversation is scored by one conditioned forward over
the conversation instead of one forward per turn over its prefix (tokens linear in the turns, not
quadratic; methods.md E3). Parts with nothing to score are never forwarded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from curate.lm import LMParams, Seq, SeqResult, load_backend
from curate.lm.spec import Runtime, auto_runtime
from curate.records import canonical_json, sha256_hex
from curate.records import turns as conversation_turns
from curate.scorers.base import Score, Scorer
from curate.templates import Rendered, get_template

STATUS_ORDER = ("ok", "truncated_ok")


class LossParams(Scorer.Params, LMParams):
    dtype: Literal["auto", "float32", "bfloat16", "float16", "bf16-matmul"] = Field(
        "auto", description="Model weights and math; auto: bf16-matmul (fp32 weights, matmuls in oneDNN's bf16 math mode) on a CPU "
        "with avx512_bf16 or AMX, float32 on other CPUs, bfloat16 on a CUDA device with bf16 support (the resolved dtype is in the "
        "store key, its reason in the run's fingerprints). With runtime openvino: float32.")
    runtime: Runtime = auto_runtime()
    template: Literal["alpaca", "wiz", "vicuna", "none", "chat"] = "alpaca"
    max_length: int = Field(512, gt=1, description="Tokens per sequence; responses are cut at the tail, prompts never.")
    span_mode: Literal["prefix_len", "offsets"] = "prefix_len"
    truncation: Literal["equal_span"] = "equal_span"
    min_response_tokens: int = Field(1, ge=1, description="Rows with fewer scored response tokens get status short_response.")
    turns: Literal["each", "first", "last"] = "each"
    context: Literal["history", "none"] = "history"
    aggregate: Literal["token_weighted", "mean", "sum", "min", "max", "last"] = "token_weighted"
    match_reference: bool = Field(False, description="Reproduce the reference numerics (truncation budgets, joins) for parity runs.")


@dataclass
class Part:
    """One sequence to score: token ids and the target span."""

    ids: list[int]
    span: tuple[int, int]
    full: int = 0  # sequence length before truncation

    @property
    def n(self) -> int:
        return max(0, self.span[1] - self.span[0])


@dataclass
class TurnJob:
    turn: int
    cond: Part
    direct: Part | None = None
    truncated: bool = False
    #: per kind ("cond", "direct"): (sum of -log p in nats, scored tokens), filled by score_batch
    result: dict[str, tuple[float, int]] = field(default_factory=dict)


@dataclass
class Pass:
    """One sequence through the model: its ids, its target spans, and for each span the (job index,
    kind) it scores. ``full``: the longest untruncated length among the parts it serves."""

    ids: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)
    refs: list[tuple[int, str]] = field(default_factory=list)
    full: int = 0


def plan_passes(jobs: list[TurnJob]) -> list[Pass]:
    """The forwards that score every non-empty part of ``jobs``: a part whose ids are a prefix of an
    existing pass's (or the other way round) joins that pass as one more span; the others get their
    own. Parts with an empty span are not forwarded."""
    passes: list[Pass] = []
    for j_i, job in enumerate(jobs):
        for kind, part in (("cond", job.cond), ("direct", job.direct)):
            if part is None or part.n <= 0:
                continue
            target = next((p for p in passes if _prefix_related(p.ids, part.ids)), None)
            if target is None:
                target = Pass(part.ids)
                passes.append(target)
            elif len(part.ids) > len(target.ids):
                target.ids = part.ids
            target.spans.append(part.span)
            target.refs.append((j_i, kind))
            target.full = max(target.full, part.full)
    return passes


def _prefix_related(a: list[int], b: list[int]) -> bool:
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    return long[: len(short)] == short


@dataclass
class RatioTerms:
    """Per scored turn: the ratio and its ingredients (sums of -log p and token counts)."""

    per_turn: list[float] = field(default_factory=list)
    nll_c: list[float] = field(default_factory=list)
    nll_d: list[float] = field(default_factory=list)
    n_c: list[int] = field(default_factory=list)
    n_d: list[int] = field(default_factory=list)

    @property
    def loss_cond(self) -> float:
        return sum(self.nll_c) / sum(self.n_c)

    @property
    def loss_direct(self) -> float:
        return sum(self.nll_d) / sum(self.n_d)


class RowSkip(Exception):
    """A row that cannot be scored for a data reason (status, not error)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class LossScorer(Scorer):
    Params = LossParams
    batch_rows = 256
    #: extra tokens the reference adds to the direct-pass budget (A1: +4 alpaca/wiz, +6 vicuna; A2: +1)
    reference_direct_slack = {"alpaca": 4, "wiz": 4, "vicuna": 6, "none": 1, "chat": 4}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.params
        self.backend = load_backend(LMParams.of(p), self.context.torch_threads, self.context.extra.get("request_cache"))
        self._template = None
        self._cache: dict[tuple[str, bool], list[int]] = {}
        self._special: dict[bool, tuple[int, int]] = {}

    # -- identity ---------------------------------------------------------------------------------
    @property
    def template(self):
        if self._template is None:
            self._template = get_template(self.params.template, self.backend.tokenizer if self.params.template == "chat" else None)
        return self._template

    def fingerprint(self) -> dict[str, Any]:
        p = self.params
        lm_keys = set(LMParams.model_fields)
        fp = {
            "method": self.method,
            "variant": getattr(self, "variant", self.method),
            "scorer_version": self.version,
            **self.backend.fingerprint(),
            **self.template.fingerprint(),
            "max_length": p.max_length,
            "truncation_policy": p.truncation if not p.match_reference else "reference",
            "multi_turn_policy": {"turns": p.turns, "context": p.context, "aggregate": p.aggregate},
            "params": {k: v for k, v in p.model_dump(mode="json").items() if k not in lm_keys},
            "match_reference": p.match_reference,
        }
        choice = getattr(self.backend, "dtype_choice", None)
        if choice is not None:  # recorded (run.json, the store's fingerprint.json), not keyed: the key holds the resolved dtype
            fp["dtype_reason"] = choice[1]
        return fp

    #: Fingerprint entries that explain the run and stay out of :attr:`key`.
    unkeyed = ("dtype_reason",)

    def keyed_fingerprint(self) -> dict[str, Any]:
        """The fingerprint without :attr:`unkeyed`: what the store key hashes (and what a rewriter that scores
        with this scorer puts in its own key)."""
        return {k: v for k, v in self.fingerprint().items() if k not in self.unkeyed}

    @property
    def key(self) -> str:
        """The store key: :meth:`keyed_fingerprint` hashed (``dtype: auto`` resolved to float32 has the key
        of an explicit ``dtype: float32``)."""
        return sha256_hex(canonical_json(self.keyed_fingerprint()))

    # -- tokenization -----------------------------------------------------------------------------
    def encode(self, text: str, special: bool) -> list[int]:
        key = (text, special)
        ids = self._cache.get(key)
        if ids is None:
            ids = self.backend.tokenizer(text, add_special_tokens=special)["input_ids"]
            self._cache[key] = ids
        return ids

    def specials(self, special: bool) -> tuple[int, int]:
        """(tokens the tokenizer adds before, after) a text when ``special``."""
        if special not in self._special:
            plain = self.backend.tokenizer("hello", add_special_tokens=False)["input_ids"]
            full = self.backend.tokenizer("hello", add_special_tokens=special)["input_ids"]
            if not special or full == plain:
                self._special[special] = (0, 0)
            else:
                before = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
                self._special[special] = (before, len(full) - before - len(plain))
        return self._special[special]

    def prefix_len(self, text: str, special: bool) -> int:
        """Tokens of ``text`` as a prefix: its encoding without any trailing special tokens."""
        return len(self.encode(text, special)) - self.specials(special)[1]

    def token_spans(self, rendered: Rendered, char_spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        special = rendered.add_special_tokens
        ids = self.encode(rendered.text, special)
        ids = ids[: len(ids) - self.specials(special)[1]]  # no trailing EOS: nothing after the reply is scored
        if self.params.span_mode == "offsets":
            enc = self.backend.tokenizer(rendered.text, add_special_tokens=special, return_offsets_mapping=True)
            starts = [a for a, b in enc["offset_mapping"]][: len(ids)]
            out = []
            for cs, ce in char_spans:
                s = next((i for i, a in enumerate(starts) if a >= cs and i > 0), len(ids))
                e = next((i for i, a in enumerate(starts) if a >= ce and i >= s), len(ids))
                out.append((s, e))
            return ids, out
        out = [(self.prefix_len(rendered.text[:cs], special), self.prefix_len(rendered.text[:ce], special)) for cs, ce in char_spans]
        return ids, [(max(s, 1), max(e, max(s, 1))) for s, e in out]

    def direct_part(self, prefix: str, body: str, special: bool, n: int | None = None) -> tuple[list[int], int]:
        """(ids of ``prefix + body``, index of body's first token). The first position has no context:
        when nothing precedes the body (bare, no BOS) its first token is not scored (reference A2)."""
        ids = self.encode(prefix + body, special)
        ids = ids[: len(ids) - self.specials(special)[1]]
        start = self.prefix_len(prefix, special) if prefix else self.specials(special)[0]
        return ids, start

    # -- turns ------------------------------------------------------------------------------------
    def selected_turns(self, messages: list[dict]) -> list[int]:
        n = len(conversation_turns(messages))
        if n == 0:
            return []
        return {"each": list(range(n)), "first": [0], "last": [n - 1]}[self.params.turns]

    def turn_messages(self, messages: list[dict], t: int) -> list[dict]:
        """Messages up to and including turn t's reply; with context none, only that turn (+ system)."""
        idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        end = idx[t] + 1
        if self.params.context == "history":
            return messages[:end]
        start = idx[t - 1] + 1 if t else (1 if messages[0]["role"] == "system" else 0)
        system = [messages[0]] if messages[0]["role"] == "system" else []
        return system + messages[start:end]

    # -- subclass hooks ---------------------------------------------------------------------------
    def jobs(self, record: dict) -> list[TurnJob]:
        raise NotImplementedError

    def combine(self, record: dict, jobs: list[TurnJob]) -> Score:
        raise NotImplementedError

    def cost(self, records: list[dict]) -> int:
        """Tokens this scorer will run through the model for ``records`` (for time estimates)."""
        total = 0
        for rec in records:
            try:
                total += sum(len(p.ids) for p in plan_passes(self.jobs(rec)))
            except RowSkip:
                continue
        return total

    # -- the batch --------------------------------------------------------------------------------
    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        self._cache.clear()
        per_row: list[list[TurnJob] | Score] = []
        seqs: list[Seq] = []
        where: list[tuple[int, Pass]] = []
        for r_i, rec in enumerate(records):
            try:
                jobs = self.jobs(rec)
            except RowSkip as skip:
                per_row.append(Score.failed(self.outputs, skip.status, "RowSkip", str(skip)))
                continue
            per_row.append(jobs)
            for ps in plan_passes(jobs):
                seqs.append(Seq(ps.ids, ps.spans))
                where.append((r_i, ps))
        results = self.backend.score(seqs) if seqs else []
        failed: dict[int, SeqResult] = {}
        for (r_i, ps), res in zip(where, results):
            for (j_i, kind), nll, n in zip(ps.refs, res.nll, res.n):
                per_row[r_i][j_i].result[kind] = (nll, n)  # type: ignore[index]
            if res.status != "ok":
                failed.setdefault(r_i, res)
        out = []
        for r_i, (rec, item) in enumerate(zip(records, per_row)):
            if isinstance(item, Score):
                out.append(item)
            elif r_i in failed:
                res = failed[r_i]
                out.append(Score.failed(self.outputs, "error", res.error_class or "error", res.message or "scoring failed"))
            else:
                out.append(self.combine(rec, item))
        return out

    # -- helpers for jobs and combine -------------------------------------------------------------
    def equal_span(self, ids: list[int], span: tuple[int, int], d_ids: list[int], d_start: int) -> tuple[Part, Part, bool]:
        """Conditioned and direct parts scoring exactly the same first n target tokens (E4), and
        whether the target was cut. ``d_start`` is the target's first token in ``d_ids``."""
        s, e = span
        L = self.params.max_length
        n = max(0, min(e - s, len(d_ids) - d_start, L - s, L - d_start))
        cond = Part(ids[: s + n], (s, s + n), len(ids))
        d_first = max(d_start, 1)  # position 0 has no context (bare, no BOS): never a target
        direct = Part(d_ids[: d_start + n], (d_first, max(d_first, d_start + n)), len(d_ids))
        return cond, direct, n < e - s

    @staticmethod
    def ratio_terms(jobs: list[TurnJob], ratio: str) -> RatioTerms:
        terms = RatioTerms()
        for j in jobs:
            if j.direct is None or j.cond.n == 0 or j.direct.n == 0:
                continue
            c, nc = j.result["cond"]
            d, nd = j.result["direct"]
            lc, ld = c / nc, d / nd
            terms.per_turn.append(lc / ld if ratio == "loss" else math.exp(lc - ld))
            terms.nll_c.append(c), terms.nll_d.append(d), terms.n_c.append(nc), terms.n_d.append(nd)
        return terms

    def aggregate(self, terms: RatioTerms, ratio: str) -> float:
        agg = self.params.aggregate
        if agg == "token_weighted":
            lc, ld = terms.loss_cond, terms.loss_direct
            return lc / ld if ratio == "loss" else math.exp(lc - ld)
        v = terms.per_turn
        return {"mean": lambda: sum(v) / len(v), "sum": lambda: sum(v), "min": lambda: min(v), "max": lambda: max(v),
                "last": lambda: v[-1]}[agg]()

    @staticmethod
    def token_counts(jobs: list[TurnJob]) -> tuple[int, int]:
        """(tokens before truncation, tokens forwarded), summed over the row's passes."""
        passes = plan_passes(jobs)
        return sum(p.full for p in passes), sum(len(p.ids) for p in passes)
