"""Reflection-Tuning (methods.md C1): a teacher model critiques a row and rewrites it.

Two operations, each one teacher call (prompts in :mod:`curate.prompts`, written for curate):

- **instruction reflection** → a new instruction Q′ and its answer A′ (tags ``[New Instruction]``,
  ``[New Answer]``); the derived row is ``(Q′, A′)``, variant ``instruction``;
- **response reflection** → a better answer A* to the row's own instruction (tag ``[Better Answer]``);
  the derived row keeps the row's user message and pairs it with A*, variant ``response``.

``mode`` picks which run (``instruction``, ``response`` or ``both``; ``both`` gives up to two derived
rows per input row, each from one call on the original). Rows whose alpaca ``input`` is not empty
follow ``input_policy``: ``include`` (default) shows the input in its own block and asks for a new
instruction that stands on its own; ``compress`` first asks the teacher to merge instruction and
input into one instruction (``[Merged Instruction]``, its own call) and reflects on that (only
instruction reflection uses it: response reflection always shows the input block); ``skip`` drops
such rows with reason ``skipped_input``.

**Length guard.** Instruction + input + answer are counted with the *student* tokenizer
(``student_tokenizer``). Over ``max_length`` tokens, the answer shown to the teacher is cut at the
tail (by tokens, at a token's character boundary) to fit; if fewer than ``min_answer_tokens`` would
remain the row is dropped with reason ``skipped_too_long``. The cut is recorded.

**Reply budget.** As in the reference, a reply gets ``max_tokens`` = min(``decoding.max_tokens``
(2048 by default), the context − the longest prompt of its batch): ``context_tokens``, else the local
teacher's ``max_position_embeddings`` (``hf``, ``vllm``), else no limit but ``max_tokens``
(:meth:`ReflectionBase.fit_replies`). A reply that hits its limit (engine status ``truncated``, or
finish reason ``length``) keeps its text in the record but is never parsed as an answer nor asked
again: the operation is ``truncated``.

**Parsing** (:func:`curate.rewrite.tags.parse_tagged`; the tag syntax, the field statuses and the
reference's parse under ``match_reference`` are described in :mod:`curate.rewrite.tags`): each field
of a reply is the segment of its bracket tag (``[New Instruction]`` … ``[End]``), ``ok`` or
``missing``, ``empty``, ``placeholder``, ``ambiguous``; a Q′ equal to the instruction it was asked to
replace (up to case and spacing) is ``unchanged``, and so is an A′ equal to the row's answer (a new
instruction with the old answer is no pair either). A Q′ row is emitted only when both Q′ and A′ are
``ok``: never an old instruction with a new answer. A reply that does not parse is asked again once
(``parse_retry``; ``Call.attempt=1``, same prompt — its own cache entry), then the operation is
``parse_failed``. A better answer A* equal to the row's answer makes no new row (the row passes
through, reason ``unchanged``). With ``match_reference: true`` the reference's rules apply instead:
its parse (a field's value is its first segment; substring placeholder tests); the retry is made
only when neither Q′ nor A′ has a non-empty segment, or when the reply has not exactly one
``[Better Answer]`` segment (:func:`wants_retry`); and a field that failed takes the original's
value (so an old instruction *can* meet a new answer, as in the reference). A row whose every field
fell back is the original again and passes through (``fallback_unchanged``).

**Dispositions.** Every input row gets one: ``used`` when at least one derived row came from it;
``passthrough`` for rows the method does not apply to (``multiturn``, ``system``, ``tool_use``:
methods.md E3), ``fallback_unchanged`` and ``unchanged``; ``dropped`` with the reason of the first
failed operation otherwise — ``parse_failed``, ``truncated`` (the reply hit its token limit),
``error`` (the model call failed after the engine's retries), ``budget_exhausted`` (a cap refused the
call), ``skipped_too_long``, ``skipped_input``.

Every call goes through the step's call engine (:class:`~curate.rewrite.llm.LLMRewriter`): cached
by (model, messages, decoding, seed, attempt), budget caps checked before each call. The
generation record of a derived row holds, per call (``compress``, ``compress_retry``,
``instruction``, ``instruction_retry``, ``response``, ``response_retry``), the prompt ref (system and user prompt
ids, versions and hashes), decoding, seed and reply (text, raw output, status, token counts,
engine retries), plus the parse result of each field, the length-guard record and the input policy.

The building blocks (:func:`single_turn`, :func:`guard`, :func:`reflect`; the parser
:func:`~curate.rewrite.tags.parse_tagged`) are shared with Selective Reflection-Tuning (:mod:`curate.rewrite.selective`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import Field

from curate.lm.calls import Call, Decoding, Reply
from curate.prompts import (
    REFLECT_COMPRESS,
    REFLECT_COMPRESS_SYSTEM,
    REFLECT_INSTRUCTION,
    REFLECT_INSTRUCTION_INPUT,
    REFLECT_INSTRUCTION_SYSTEM,
    REFLECT_RESPONSE,
    REFLECT_RESPONSE_INPUT,
    REFLECT_RESPONSE_INPUT_SYSTEM,
    REFLECT_RESPONSE_SYSTEM,
    REFLECTION_PROMPTS,
    Prompt,
)
from curate.records import message, sha256_hex
from curate.rewrite.base import UnitResult
from curate.rewrite.llm import LLMParams, LLMRewriter
from curate.rewrite.tags import FieldParse, parse_tagged, same_text
from curate.templates import alpaca_input

# -- the retry rule -------------------------------------------------------------------------------

def wants_retry(kind: str, parsed: dict[str, FieldParse], match_reference: bool) -> bool:
    """Whether a reply that did not give every field is asked again. Ours: any field not ``ok``. The
    reference's rule (``match_reference``): instruction reflection only when neither field has a
    non-empty segment; response reflection when the reply has not exactly one ``[Better Answer]``
    segment (a placeholder or an empty single segment is not retried: it falls back)."""
    if match_reference and kind == "instruction":
        return all(f.status in ("missing", "empty") for f in parsed.values())
    if match_reference and kind == "response":
        return parsed["better_answer"].n_segments != 1
    return any(f.status != "ok" for f in parsed.values())


# -- rows -----------------------------------------------------------------------------------------

@dataclass
class Pair:
    """A single-turn row as the prompts see it."""

    sample_id: str
    user: str  # the user message, exactly as in the row
    instruction: str  # alpaca instruction (or the user message)
    input: str  # alpaca input ("" when none)
    answer: str
    answer_shown: str = ""  # the answer after the length guard
    guard: dict[str, Any] = field(default_factory=dict)


def single_turn(record: dict[str, Any]) -> tuple[Pair | None, str | None]:
    """(the row's :class:`Pair`, None) or (None, passthrough reason): ``multiturn``, ``system``,
    ``tool_use`` (methods.md E3: reflection is single-turn only)."""
    msgs = record["messages"]
    if record.get("tools") or any(m.get("tool_calls") for m in msgs) or any(m["role"] == "tool" for m in msgs):
        return None, "tool_use"
    if msgs and msgs[0]["role"] == "system":
        return None, "system"
    if [m["role"] for m in msgs] != ["user", "assistant"]:
        return None, "multiturn"
    user, answer = msgs[0]["content"], msgs[1]["content"]
    split = alpaca_input(record)
    if split is not None and split[0] == user:
        _, ins, inp = split
    else:
        ins, inp = user, ""
    return Pair(record["sample_id"], user, ins, inp, answer, answer), None


def guard(pair: Pair, tokenizer: Any, max_length: int, min_answer_tokens: int) -> tuple[Pair | None, str | None]:
    """The length guard (module docstring): the pair with ``answer_shown`` cut to fit, or (None, detail)."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    n_q, n_in = count(pair.instruction), count(pair.input)
    enc = tokenizer(pair.answer, add_special_tokens=False, return_offsets_mapping=True)
    n_a = len(enc["input_ids"])
    total = n_q + n_in + n_a
    record = {"n_tokens": total, "max_length": max_length}
    if total <= max_length:
        return replace(pair, answer_shown=pair.answer, guard={**record, "truncated": False}), None
    keep = max_length - n_q - n_in
    if keep < min_answer_tokens:
        return None, (f"instruction + input + answer = {total} tokens > max_length {max_length}, and only {max(keep, 0)} answer "
                      f"tokens would remain (min_answer_tokens {min_answer_tokens})")
    cut = enc["offset_mapping"][keep - 1][1]
    return replace(pair, answer_shown=pair.answer[:cut], guard={**record, "truncated": True, "answer_tokens_shown": keep,
                                                                "answer_tokens": n_a}), None


# -- teacher jobs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptPair:
    """A system persona and a user template, sent as one call; its ref names both."""

    system: Prompt
    user: Prompt

    def ref(self) -> dict[str, str]:
        return {"id": self.user.id, "version": self.user.version, "hash": self.user.hash, "system_id": self.system.id,
                "system_version": self.system.version, "system_hash": self.system.hash}

    def messages(self, **fields: str) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.system.text}, {"role": "user", "content": self.user.text.format(**fields)}]

    @property
    def shape(self) -> dict[str, Any] | None:
        """The reply's declared output shape: the user prompt's."""
        return self.user.shape


INSTRUCTION = PromptPair(REFLECT_INSTRUCTION_SYSTEM, REFLECT_INSTRUCTION)
INSTRUCTION_INPUT = PromptPair(REFLECT_INSTRUCTION_SYSTEM, REFLECT_INSTRUCTION_INPUT)
RESPONSE = PromptPair(REFLECT_RESPONSE_SYSTEM, REFLECT_RESPONSE)
RESPONSE_INPUT = PromptPair(REFLECT_RESPONSE_INPUT_SYSTEM, REFLECT_RESPONSE_INPUT)
COMPRESS = PromptPair(REFLECT_COMPRESS_SYSTEM, REFLECT_COMPRESS)

#: the fields each kind of call must yield
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("new_instruction", "new_answer"),
    "response": ("better_answer",),
    "compress": ("merged_instruction",),
}


@dataclass
class Job:
    """One teacher operation on one row: ``kind`` (instruction | response | compress), the texts it
    shows, and what the fields fall back to under ``match_reference``."""

    key: str  # the row's sample_id (seeds and bookkeeping)
    kind: str
    instruction: str
    input: str = ""
    answer: str = ""
    fallback: dict[str, str] = field(default_factory=dict)

    def prompt(self) -> PromptPair:
        if self.kind == "compress":
            return COMPRESS
        if self.kind == "instruction":
            return INSTRUCTION_INPUT if self.input else INSTRUCTION
        return RESPONSE_INPUT if self.input else RESPONSE

    def messages(self) -> list[dict[str, Any]]:
        fields = {"instruction": self.instruction, "input": self.input}
        if self.kind != "compress":
            fields["answer"] = self.answer
        return self.prompt().messages(**fields)


@dataclass
class Outcome:
    """What a job gave: ``status`` ok | parse_failed | truncated (the reply hit its token limit) |
    error | budget_exhausted | fallback (some field took the original's value; match_reference
    only), the field values, the calls made (name, call, reply) for the generation record, and the
    parse of each field."""

    status: str
    values: dict[str, str] = field(default_factory=dict)
    exchanges: list[tuple[str, Call, Reply]] = field(default_factory=list)
    parse: dict[str, Any] = field(default_factory=dict)
    detail: str | None = None
    fell_back: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "fallback")


def parse_reply(job: Job, text: str, match_reference: bool = False, truncated: bool = False) -> dict[str, FieldParse]:
    """The fields of ``job``'s kind parsed from a reply. A new instruction equal to the one shown (or
    to the row's user message) is ``unchanged``: emitting it would pair an old instruction with a new
    answer; so is a new answer equal to the answer shown (or the row's): a new instruction with the
    old answer is no pair either. ``truncated``: see :func:`parse_field`."""
    parsed = parse_tagged(text, KIND_FIELDS[job.kind], match_reference, truncated)
    for name, old in (("new_instruction", job.instruction), ("new_answer", job.answer)):
        f = parsed.get(name)
        if f is not None and f.status == "ok" and same_text(f.value, old, job.fallback.get(name)):
            parsed[name] = FieldParse("unchanged", None, f.n_segments)
    return parsed


def job_seed(run_seed: int, method: str, job: Job, attempt: int) -> int:
    """Seed of a sampled call (E2: from the run seed and the row, not the batch)."""
    return int(sha256_hex(str(run_seed), method, job.key, job.kind, str(attempt))[:15], 16)


def cut_off(reply: Reply, call: Call) -> bool:
    """A reply that hit its token limit: status ``truncated``, finish reason ``length``, or — when the
    finish reason is unknown (a reply cached before it was recorded) — ``max_tokens`` tokens
    generated. Its text is kept for the record, never parsed as an answer."""
    if reply.status == "truncated":
        return True
    finish = getattr(reply, "finish_reason", None)
    if finish is not None:
        return finish == "length"
    return reply.status == "ok" and reply.n_tokens >= call.decoding.max_tokens


def _truncated(job: Job, exchanges: list[tuple[str, Call, Reply]], match_reference: bool) -> Outcome:
    _, call, reply = exchanges[-1]
    parsed = parse_reply(job, reply.text or "", match_reference, truncated=True)  # for the record only: never a value
    return Outcome("truncated", exchanges=exchanges, parse={k: f.record() for k, f in parsed.items()},
                   detail=f"{job.kind}: the reply reached max_tokens ({call.decoding.max_tokens}) and was cut off")


def reflect(rewriter: ReflectionBase, jobs: list[Job]) -> list[Outcome]:
    """Run ``jobs`` on the teacher (one batch, then one batch of retries for the replies that did not
    parse; :func:`wants_retry`) and parse the replies. Each batch's replies get the tokens the context
    leaves (:meth:`ReflectionBase.fit_replies`). A reply cut off by its token limit
    (:func:`cut_off`) is ``truncated``: never parsed as an answer, never retried. The calls are named
    by the job's kind in the generation record (``<kind>``, ``<kind>_retry``)."""
    mr, retry = rewriter.params.match_reference, rewriter.params.parse_retry

    def make(job: Job, attempt: int) -> Call:
        seed = job_seed(rewriter.context.seed, rewriter.method, job, attempt)
        return rewriter.call(job.prompt(), job.messages(), seed=seed, attempt=attempt)

    def read(job: Job, reply: Reply) -> dict[str, FieldParse]:
        return parse_reply(job, reply.text or "", mr)

    calls = rewriter.fit_replies([make(j, 0) for j in jobs])
    replies = rewriter.ask(calls)
    outcomes: list[Outcome | None] = [None] * len(jobs)
    first: dict[int, dict[str, FieldParse]] = {}
    again: list[int] = []
    for i, (job, call, reply) in enumerate(zip(jobs, calls, replies)):
        label = job.kind
        if cut_off(reply, call):
            outcomes[i] = _truncated(job, [(label, call, reply)], mr)
            continue
        if reply.status != "ok":
            outcomes[i] = Outcome(reply.status, exchanges=[(label, call, reply)], detail=f"{job.kind}: {reply.error or reply.status}")
            continue
        parsed = read(job, reply)
        first[i] = parsed
        if all(f.status == "ok" for f in parsed.values()):
            outcomes[i] = Outcome("ok", {k: f.value for k, f in parsed.items()}, [(label, call, reply)],
                                  {k: f.record() for k, f in parsed.items()})
        elif retry and wants_retry(job.kind, parsed, mr):
            again.append(i)
        else:
            why = "no retry (parse_retry false)" if not retry else "not retried (the reference's retry rule)"
            outcomes[i] = _failed(job, [(label, call, reply)], parsed, mr, why)
    if again:
        retry_calls = rewriter.fit_replies([make(jobs[i], 1) for i in again])
        for i, call, reply in zip(again, retry_calls, rewriter.ask(retry_calls)):
            job, label = jobs[i], jobs[i].kind
            exchanges = [(label, calls[i], replies[i]), (f"{label}_retry", call, reply)]
            if cut_off(reply, call):
                outcomes[i] = _truncated(job, exchanges, mr)
                continue
            if reply.status != "ok":
                outcomes[i] = _failed(job, exchanges, first[i], mr, f"the retry was not made or failed: {reply.error or reply.status}")
                continue
            parsed = read(job, reply)
            if all(f.status == "ok" for f in parsed.values()):
                outcomes[i] = Outcome("ok", {k: f.value for k, f in parsed.items()}, exchanges,
                                      {k: {**f.record(), "first_attempt": first[i][k].status} for k, f in parsed.items()})
            else:
                outcomes[i] = _failed(job, exchanges, parsed, mr, "after one retry")
    return outcomes  # type: ignore[return-value]


def _failed(job: Job, exchanges, parsed: dict[str, FieldParse], match_reference: bool, when: str) -> Outcome:
    detail = f"{job.kind}: " + ", ".join(f"{k} {f.status}" for k, f in parsed.items() if f.status != "ok") + f" ({when})"
    record = {k: f.record() for k, f in parsed.items()}
    if not match_reference:
        return Outcome("parse_failed", exchanges=exchanges, parse=record, detail=detail)
    values = {k: (f.value if f.status == "ok" else job.fallback[k]) for k, f in parsed.items()}
    fell = tuple(k for k, f in parsed.items() if f.status != "ok")
    return Outcome("fallback", values, exchanges, record, detail + "; the reference's per-field fallback to the original", fell)


# -- the rewriter ---------------------------------------------------------------------------------

class ReflectionDecoding(Decoding):
    """The teacher's decoding; ``max_tokens`` defaults to the reference's 2048."""

    max_tokens: int = Field(2048, gt=0, description="Most new tokens per reply (reference: 2048); the context left by "
                                                    "the longest prompt of a batch lowers it (context_tokens).")


class ReflectionCommon(LLMParams):
    """Parameters shared by Reflection-Tuning and Selective Reflection-Tuning."""

    decoding: ReflectionDecoding = Field(default_factory=ReflectionDecoding,
                                         description="How the teacher generates (greedy; max_tokens 2048 by default).")
    context_tokens: int | None = Field(
        None, gt=0, description="Tokens a prompt and its reply share (the reference: 4050 for gpt-3.5-turbo). Each batch's "
                                "max_tokens is min(decoding.max_tokens, context_tokens - its longest prompt). None: the local "
                                "teacher's max_position_embeddings (hf, vllm); no limit but max_tokens for openai.")

    input_policy: Literal["include", "compress", "skip"] = Field(
        "include", description="Rows with an alpaca input: show it (include), merge it into the instruction first "
                               "(compress, one more call), or drop the row (skip).")
    max_length: int = Field(2048, gt=0, description="Length guard: most student tokens of instruction + input + answer shown "
                                                    "to the teacher; the answer's tail is cut to fit.")
    min_answer_tokens: int = Field(32, ge=1, description="A row whose answer would keep fewer tokens is skipped_too_long.")
    parse_retry: bool = Field(True, description="Ask once more (same prompt, attempt 1) when a reply does not parse.")
    unit_rows: int = Field(64, gt=0, description="Rows per stored unit of work (resume granularity).")
    match_reference: bool = Field(False, description="The reference's per-field fallback to the original when a field "
                                                     "does not parse, and its substring placeholder test.")


class ReflectionParams(ReflectionCommon):
    mode: Literal["instruction", "response", "both"] = Field("both", description="Which reflections run on each row.")
    student_tokenizer: str = Field("smollm2-135m-instruct", description="Tokenizer of the length guard (the student model's).")


class ReflectionBase(LLMRewriter):
    """Rows, units, the length guard and compression, shared by ``reflection`` and ``selective_reflection``."""

    prompts = REFLECTION_PROMPTS

    def guard_tokenizer_name(self) -> str:
        raise NotImplementedError

    @property
    def guard_tokenizer(self):
        from curate.rewrite.tokens import load_tokenizer

        return load_tokenizer(self.guard_tokenizer_name())

    def reply_context(self) -> int | None:
        """The tokens a prompt and its reply share: ``context_tokens``, else the local teacher's
        context window (:func:`model_context`), else None (no limit but ``max_tokens``)."""
        if self.params.context_tokens is not None:
            return self.params.context_tokens
        if not hasattr(self, "_context_window"):
            self._context_window = model_context(self.engine.backend)
        return self._context_window

    def fit_replies(self, calls: list[Call]) -> list[Call]:
        """The reference's reply budget (methods.md C1): the calls of one batch get ``max_tokens`` =
        min(``decoding.max_tokens``, context − the longest prompt of the batch, at least 1), the
        prompts counted with the teacher's tokenizer and chat template. Unchanged without a context
        (:meth:`reply_context`)."""
        limit = self.reply_context() if calls else None
        if limit is None:
            return calls
        longest = max(self.engine.prompt_tokens(c) for c in calls)
        out = []
        for c in calls:
            n = max(1, min(c.decoding.max_tokens, limit - longest))
            out.append(c if n == c.decoding.max_tokens else replace(c, decoding=c.decoding.model_copy(update={"max_tokens": n})))
        return out

    def fingerprint(self) -> dict[str, Any]:
        from curate.models import model_revision

        name = self.guard_tokenizer_name()
        return {**super().fingerprint(), "guard_tokenizer": {"name": name, "revision": model_revision(name)}}

    def units(self, n_records: int) -> list[str]:
        k = self.params.unit_rows
        return [f"rows-{s}-{min(s + k, n_records)}" for s in range(0, n_records, k)] or ["rows-0-0"]

    @staticmethod
    def unit_slice(unit: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        _, start, end = unit.split("-")
        return records[int(start):int(end)]

    def prepare(self, records: list[dict[str, Any]], out: UnitResult) -> list[Pair]:
        """The rows reflection applies to (length-guarded); every other row gets its disposition in ``out``."""
        p = self.params
        pairs = []
        for rec in records:
            pair, why = single_turn(rec)
            if pair is None:
                out.dispositions[rec["sample_id"]] = ("passthrough", why, "reflection rewrites single-turn rows without tools "
                                                                           "or a system message")
                continue
            if pair.input and p.input_policy == "skip":
                out.dispositions[pair.sample_id] = ("dropped", "skipped_input", "the row has an input and input_policy is skip")
                continue
            guarded, detail = guard(pair, self.guard_tokenizer, p.max_length, p.min_answer_tokens)
            if guarded is None:
                out.dispositions[pair.sample_id] = ("dropped", "skipped_too_long", detail)
                continue
            pairs.append(guarded)
        return pairs

    def begin(self, unit: str, records: list[dict[str, Any]], out: UnitResult) -> tuple[list[Pair], dict[str, Any]]:
        """The pairs of a unit's rows that reflection applies to (:meth:`prepare`), and the unit's
        stats so far: rows, reflected, and the other rows counted by disposition and reason."""
        rows = self.unit_slice(unit, records)
        pairs = self.prepare(rows, out)
        stats: dict[str, Any] = {"rows": len(rows), "reflected": len(pairs)}
        for rec in rows:
            disp = out.dispositions.get(rec["sample_id"])
            if disp is not None:
                count(stats, disp[0], disp[1])
        return pairs, stats

    def compress(self, pairs: list[Pair]) -> dict[str, Outcome]:
        """With ``input_policy: compress``: the merged instruction of each pair that has an input."""
        if self.params.input_policy != "compress":
            return {}
        todo = [p for p in pairs if p.input]
        jobs = [Job(p.sample_id, "compress", p.instruction, p.input, fallback={"merged_instruction": p.user}) for p in todo]
        return {p.sample_id: o for p, o in zip(todo, reflect(self, jobs))}

    def instruction_jobs(self, pairs: list[Pair], merged: dict[str, Outcome]) -> tuple[list[Pair], list[Job], dict[str, Outcome]]:
        """Instruction-reflection jobs (the pairs they are for), and the outcomes of pairs whose
        compression failed (they get no instruction job)."""
        kept, jobs, failed = [], [], {}
        for p in pairs:
            ins, inp = p.instruction, p.input
            m = merged.get(p.sample_id)
            if m is not None:
                if not m.ok:  # no merged instruction: no instruction reflection (the detail names the compress call)
                    failed[p.sample_id] = m
                    continue
                ins, inp = m.values["merged_instruction"], ""
            kept.append(p)
            jobs.append(Job(p.sample_id, "instruction", ins, inp, p.answer_shown,
                            fallback={"new_instruction": p.user, "new_answer": p.answer}))
        return kept, jobs, failed


def model_context(backend: Any) -> int | None:
    """The context window of a local teacher (``hf``, ``vllm``): ``max_position_embeddings`` of its
    config; None for other backends (an openai server's model is not known here) or when the
    config does not say."""
    r = getattr(backend, "resolved", None) if getattr(backend, "name", None) in ("hf", "vllm") else None
    if r is None:
        return None
    import json
    from pathlib import Path

    path = Path(r.location) / "config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
    else:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(r.location, revision=r.revision if r.source == "hub" else None).to_dict()
        except (OSError, ValueError):
            return None
    config = {**(config.get("text_config") or {}), **config}
    n = config.get("max_position_embeddings")
    return int(n) if isinstance(n, int) and n > 0 else None


def user_assistant(user: str, assistant: str) -> list[dict[str, Any]]:
    return [message("user", user), message("assistant", assistant)]


def count(stats: dict[str, Any], group: str, key: str) -> None:
    stats.setdefault(group, {})
    stats[group][key] = stats[group].get(key, 0) + 1


class ReflectionTuning(ReflectionBase):
    """The ``reflection`` rewrite step (methods.md C1; see the module docstring)."""

    method = "reflection"
    # 1.1: an A′ equal to the row's answer is unchanged; a repeated A* passes the row through as unchanged;
    # 1.2: max_tokens 2048 less the context the prompt takes, truncated replies, parser fixes, the reference's retry rule
    version = "1.2"
    Params = ReflectionParams

    def guard_tokenizer_name(self) -> str:
        return self.params.student_tokenizer

    @property
    def kinds(self) -> tuple[str, ...]:
        m = self.params.mode
        return ("instruction", "response") if m == "both" else (m,)

    def plan_calls(self, n_records: int) -> int:
        """Most calls: per row, each reflection of ``mode`` and (compress) the merge, each with its retry."""
        per = len(self.kinds) + (1 if self.params.input_policy == "compress" and "instruction" in self.kinds else 0)
        return n_records * per * (2 if self.params.parse_retry else 1)

    def run_unit(self, unit: str, records: list[dict[str, Any]]) -> UnitResult:
        out = UnitResult()
        pairs, stats = self.begin(unit, records, out)
        results: dict[str, dict[str, Outcome]] = {x.sample_id: {} for x in pairs}
        merged: dict[str, Outcome] = {}
        jobs: list[Job] = []
        if "instruction" in self.kinds:
            merged = self.compress(pairs)
            _, jobs, failed = self.instruction_jobs(pairs, merged)
            for sid, o in failed.items():
                results[sid]["instruction"] = o
        if "response" in self.kinds:
            jobs += [Job(x.sample_id, "response", x.instruction, x.input, x.answer_shown, fallback={"better_answer": x.answer})
                     for x in pairs]
        for job, o in zip(jobs, reflect(self, jobs)):  # both kinds in one batch of calls (and one of retries)
            results[job.key][job.kind] = o
        for x in pairs:
            self._emit(x, results[x.sample_id], merged.get(x.sample_id), out, stats)
        stats["calls"] = self.budget_stats()
        out.stats = stats
        return out

    def _emit(self, x: Pair, res: dict[str, Outcome], merged: Outcome | None, out: UnitResult, stats: dict[str, Any]) -> None:
        p = self.params
        made, fell_back, failures = 0, 0, []
        for kind in self.kinds:
            o = res[kind]
            count(stats, kind, o.status)
            if not o.ok:
                failures.append(o)
                continue
            if kind == "instruction":
                q, a = o.values["new_instruction"], o.values["new_answer"]
            else:
                q, a = x.user, o.values["better_answer"]
            if q == x.user and a == x.answer:  # the original itself: every field fell back (match_reference),
                fell_back += o.status == "fallback"  # or a better answer repeats the row's answer
                continue
            exchanges = list(merged.exchanges) if merged is not None and kind == "instruction" else []
            exchanges += o.exchanges
            generation = self.generation(
                exchanges, variant=kind, parse=o.parse, parse_status=o.status, fell_back=list(o.fell_back),
                input_policy=p.input_policy if x.input else None, length_guard=x.guard, match_reference=p.match_reference)
            original = {"instruction": q if kind == "instruction" else x.instruction,
                        "input": "" if kind == "instruction" else x.input, "output": a}
            out.derive(user_assistant(q, a), [x.sample_id], kind, generation, original=original)
            count(stats, "derived", kind)
            made += 1
        if made:
            return
        if failures:
            out.dispositions[x.sample_id] = ("dropped", failures[0].status, "; ".join(f.detail or f.status for f in failures))
        elif fell_back:
            out.dispositions[x.sample_id] = ("passthrough", "fallback_unchanged", "every field fell back to the original (match_reference)")
        else:
            out.dispositions[x.sample_id] = ("passthrough", "unchanged", "the better answer repeats the row's answer")

