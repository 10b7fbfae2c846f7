"""``curate eval``: held-out loss, generation and pairwise judging of one model on one eval set.

:func:`evaluate` writes an eval directory::

    <out>/eval.json           the numbers (below), the model and eval set identities, timings
    <out>/generations.jsonl   per eval row: prompt, the model's answer, the reference, tokens
    <out>/judgments.jsonl     per eval row: both judge replies, verdicts and points

- **held-out loss**: the perplexity scorer (the masked-CE engine: sequences sorted by length and
  batched under a token budget, the LM head only at scored positions) on every eval row's reference
  replies under the model's chat template; ``loss`` = total nats / total scored tokens (token
  weighted over the set), ``ppl`` = exp(loss). The ``vllm`` backend (``prompt_logprobs``) when vLLM is
  importable and a GPU is present, the ``hf`` backend otherwise.
- **generation**: greedy answers to each eval prompt (every message before the final reply), batched
  by the call engine (hf: left-padded batches; vllm: one call per chunk) and cached per call in
  ``<store>/calls`` (``store_dir``), else in ``calls/`` beside the eval directory.
- **judging**: :mod:`curate.evaluate.judge` (pairwise against the reference, both orders).

A finished eval with the same key (model revision, eval rows, settings, judge) is returned as it is;
generations and judge replies are cached per call, so an interrupted eval repeats none.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from curate.evaluate.judge import judge_pairs, prompt_refs, summarise
from curate.evaluate.spec import EvalSpec
from curate.lm.calls import Call, CallEngine
from curate.lm.spec import LMParams
from curate.records import canonical_json, sha256_hex

log = logging.getLogger("curate.eval")
GENERATE_REF = {"id": "eval_prompt", "version": "1", "hash": "the eval set's own prompt, sent as it is"}


def model_params(model: str, spec: EvalSpec) -> LMParams:
    return LMParams(backend=spec.resolved_backend(), model=model, dtype=spec.dtype, max_tokens_per_batch=spec.max_tokens_per_batch)


def default_out(model: str, key: str) -> Path:
    """Beside a trained model (``<train dir>/eval/<key>``), else ``out/eval/<key>``."""
    p = Path(model)
    if p.is_dir() and (p.parent / "train.json").exists():
        return p.parent / "eval" / key[:12]
    return Path("out") / "eval" / key[:12]


def evaluate(model: str, spec: EvalSpec, out_dir: str | os.PathLike | None = None, store_dir: str | os.PathLike | None = None,
             base_dir: str = ".") -> dict[str, Any]:
    """Evaluate ``model`` (any name curate resolves: bundled, local dir, a ``curate train`` adapter,
    hub id) on ``spec.eval_set``; return the record also written to ``eval.json``."""
    from curate.ingest.eval_set import read_eval_set, read_prompts
    from curate.lm import load_backend
    from curate.models import set_torch_threads

    t0 = time.perf_counter()
    threads = spec.torch_threads or min(2, os.cpu_count() or 1)
    set_torch_threads(threads)
    if spec.prompt_field:
        rows, n_bad = read_prompts(spec.eval_set, spec.prompt_field, base_dir)
    else:
        rows, n_bad = read_eval_set(spec.eval_set, base_dir)
    lm = model_params(model, spec)
    backend = load_backend(lm, threads)
    judge = load_backend(LMParams.of(spec.judge), threads) if spec.judge else None
    key = sha256_hex(canonical_json({
        "model": backend.fingerprint(), "rows": [r["sample_id"] for r in rows],
        "spec": spec.model_dump(mode="json", exclude={"torch_threads", "eval_set"}), "judge": [judge.fingerprint(), prompt_refs(spec.judge.mode)] if judge else None,
        "reference": _reference_fingerprint(spec, lm, threads),
    }))
    out = Path(out_dir) if out_dir else default_out(model, key)
    done = out / "eval.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        log.info("eval: %s already evaluated (%s)", model, out)
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    # replies are cached across evals (a changed judge setting does not regenerate the answers)
    calls_dir = Path(store_dir) / "calls" if store_dir else out.parent / "calls"
    record: dict[str, Any] = {"key": key, "model": model, "model_fingerprint": backend.fingerprint(),
                              "eval_set": {**spec.eval_set.model_dump(mode="json", exclude_none=True), "n_rows": len(rows), "n_invalid": n_bad},
                              "spec": spec.model_dump(mode="json")}
    log.info("eval: %s on %s (%d rows)", model, spec.eval_set.path or spec.eval_set.hub, len(rows))
    if spec.loss and not spec.prompt_field:  # a prompts-only set has no answers to score
        record["loss"] = held_out_loss(model, spec, rows, threads)
        log.info("eval: held-out loss %.4f (ppl %.2f) over %d tokens", record["loss"]["loss"], record["loss"]["ppl"], record["loss"]["n_tokens"])
    if spec.judge:
        record.update(generate_and_judge(backend, judge, spec, rows, calls_dir, out, threads))
    record["seconds"] = time.perf_counter() - t0
    from curate.models import evict

    evict(backend.resolved.location if hasattr(backend, "resolved") else model)  # free the evaluated model (GPU memory) for the next one
    from curate.io import write_json

    write_json(done, record)
    return record


def _reference_fingerprint(spec: EvalSpec, lm: LMParams, threads: int) -> Any:
    if spec.reference == "answers":
        return "answers"
    from curate.lm import load_backend

    return load_backend(lm.model_copy(update={"model": spec.reference}), threads).fingerprint()


def held_out_loss(model: str, spec: EvalSpec, rows: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """Token-weighted loss of ``model`` on the rows' replies (the perplexity scorer, chat template)."""
    from curate.scorers.base import ScorerContext
    from curate.scorers.perplexity import PerplexityScorer

    lm = model_params(model, spec)
    scorer = PerplexityScorer("eval_loss", {**lm.model_dump(), "template": "chat", "max_length": spec.max_length},
                              ScorerContext(torch_threads=threads))
    t0 = time.perf_counter()
    scores = scorer.score_records(rows)
    seconds = time.perf_counter() - t0
    ok = [s for s in scores if s.status in ("ok", "truncated_ok")]
    nll = sum(s.values["loss"] * s.components["n_tokens"] for s in ok)
    n = sum(s.components["n_tokens"] for s in ok)
    forwarded = sum(s.n_tokens_used or 0 for s in ok)
    statuses: dict[str, int] = {}
    for s in scores:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    loss = nll / n if n else math.nan
    return {"loss": loss, "ppl": math.exp(loss) if n else math.nan, "n_tokens": n, "n_rows": len(ok), "statuses": statuses,
            "seconds": seconds, "tokens_per_s": forwarded / seconds if seconds else None, "backend": lm.backend}


def _prompt(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every message before the final reply (a prompts-only row: all of it)."""
    msgs = row["messages"]
    if msgs[-1]["role"] != "assistant":
        return msgs
    return msgs[:-1]


def question_text(prompt: list[dict[str, Any]]) -> str:
    """The request as the judge sees it: the user's message, or the whole conversation so far."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt)


#: reply statuses that carry a model answer (``truncated``: cut by max_tokens)
ANSWERED = ("ok", "truncated")


def _answers(backend, spec: EvalSpec, rows, calls_dir: Path) -> tuple[list, dict[str, Any]]:
    engine = CallEngine(backend, calls_dir)
    t0 = time.perf_counter()
    replies = engine.run([Call(_prompt(r), GENERATE_REF, spec.generate) for r in rows])
    seconds = time.perf_counter() - t0
    # an answer cut by the token limit is still the model's answer within its budget: judged, and counted
    made = [r for r in replies if not r.cached and r.status in ANSWERED]
    stats = {"n_ok": sum(r.status in ANSWERED for r in replies), "n_truncated": sum(r.status == "truncated" for r in replies),
             "n_failed": sum(r.status not in ANSWERED for r in replies),
             "mean_tokens": sum(r.n_tokens for r in replies) / len(replies), "cached": engine.spent.cache_hits, "seconds": seconds,
             "tokens_per_s": sum(r.n_tokens for r in made) / seconds if made and seconds else None}
    return replies, stats


def generate_and_judge(backend, judge, spec: EvalSpec, rows, calls_dir: Path, out: Path, threads: int) -> dict[str, Any]:
    from curate.io import write_jsonl

    replies, gen_stats = _answers(backend, spec, rows, calls_dir)
    if spec.reference == "answers":
        references = [r["messages"][-1]["content"] for r in rows]  # a canonical row ends on its reply
    else:
        from curate.lm import load_backend

        ref_backend = load_backend(model_params(spec.reference, spec), threads)
        ref_replies, _ = _answers(ref_backend, spec, rows, calls_dir)
        references = [r.text for r in ref_replies]
    log.info("eval: %d answers generated (%d from the cache)", gen_stats["n_ok"], gen_stats["cached"])
    todo = [i for i, (a, ref) in enumerate(zip(replies, references)) if a.status in ANSWERED and ref is not None]
    t0 = time.perf_counter()
    items = [(question_text(_prompt(rows[i])), replies[i].text, references[i]) for i in todo]
    judged = judge_pairs(judge, spec.judge.mode, spec.judge.decoding, items, calls_dir)
    judge_seconds = time.perf_counter() - t0
    for i, j in zip(todo, judged):
        j["id"] = rows[i]["sample_id"]
    generations = []
    for i, (row, a, ref) in enumerate(zip(rows, replies, references)):
        generations.append({"id": row["sample_id"], "prompt": _prompt(row), "answer": a.text, "status": a.status,
                            "n_tokens": a.n_tokens, "reference": ref})
    write_jsonl(out / "generations.jsonl", generations)
    write_jsonl(out / "judgments.jsonl", judged)
    summary = summarise(judged)
    summary.update(judge=judge.fingerprint(), mode=spec.judge.mode, prompts=prompt_refs(spec.judge.mode), seconds=judge_seconds)
    if summary["win_rate"] is not None:
        log.info("eval: win rate %.3f against the reference (%d judged, %d parse failures)", summary["win_rate"], summary["n_judged"],
                 summary["n_parse_failed"])
    return {"generation": gen_stats, "judge": summary}
