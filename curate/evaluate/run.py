"""``curate eval``: held-out loss, generation and pairwise judging of one model on one eval set.

:func:`evaluate` writes an eval directory::

    <out>/eval.json           the numbers (below), the model and eval set identities, timings
    <out>/losses.jsonl        per eval row: its held-out loss and scored tokens
    <out>/generations.jsonl   per eval row: prompt, the model's answer (each turn's, for a multi-turn row), the reference, tokens
    <out>/judgments.jsonl     per eval row: both judge replies, verdicts and points

- **held-out loss**: the perplexity scorer (the masked-CE engine: sequences sorted by length and
  batched under a token budget, the LM head only at scored positions) on every eval row's reference
  replies under the model's chat template; ``loss`` = total nats / total scored tokens (token
  weighted over the set), ``ppl`` = exp(loss); ``se`` (delta-method) and ``ci95`` (percentile bootstrap
  over the scored rows, ``bootstrap`` resamples drawn with ``seed``). The ``vllm`` backend
  (``prompt_logprobs``) when vLLM is importable and a GPU is present, the ``hf`` backend otherwise.
- **generation**: greedy answers to each eval prompt, batched by the call engine (hf: left-padded
  batches; vllm: one call per chunk) and cached per call in ``<store>/calls`` (``store_dir``), else in
  ``calls/`` beside the eval directory. A multi-turn row (MT-Bench) is answered turn by turn: each later
  turn is asked after the model's own earlier answers, not the reference's. Reported: answers made,
  ``n_truncated`` / ``truncated_rate`` (answers with a turn cut by ``max_tokens``), ``mean_tokens`` and
  ``avg_length`` (characters, as AlpacaEval's ``avg_length``); ``truncated_rate`` and ``avg_length`` also
  with ``_se`` and ``_ci95``.
- **judging**: :mod:`curate.evaluate.judge` (pairwise against the reference, both orders; the judge's
  validity; rates with standard errors and intervals; the length-controlled win rate).

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

import numpy as np

from curate.evaluate import stats
from curate.evaluate.judge import judge_pairs, prompt_refs, summarise
from curate.evaluate.spec import EvalSpec
from curate.lm.calls import Call, CallEngine
from curate.lm.spec import LMParams
from curate.records import canonical_json, sha256_hex
from curate.store import calls_dir as store_calls_dir

log = logging.getLogger("curate.eval")
GENERATE_REF = {"id": "eval_prompt", "version": "1", "hash": "the eval set's own prompt, sent as it is"}
#: what an eval record holds; part of its key, so a record of an older protocol is evaluated again
#: (2: judge validity, intervals, length-controlled rates; multi-turn rows answered after the model's own turns)
PROTOCOL = 2


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
        "protocol": PROTOCOL, "model": backend.fingerprint(), "rows": [r["sample_id"] for r in rows],
        "spec": spec.model_dump(mode="json", exclude={"torch_threads", "eval_set"}),
        "judge": [judge.fingerprint(), prompt_refs(spec.judge.mode)] if judge else None,
        "reference": _reference_fingerprint(spec, lm, threads),
    }))
    out = Path(out_dir) if out_dir else default_out(model, key)
    done = out / "eval.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        log.info("eval: %s already evaluated (%s)", model, out)
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    # replies are cached across evals (a changed judge setting does not regenerate the answers)
    calls_dir = store_calls_dir(store_dir) if store_dir else out.parent / "calls"
    record: dict[str, Any] = {"key": key, "model": model, "model_fingerprint": backend.fingerprint(),
                              "eval_set": {**spec.eval_set.model_dump(mode="json", exclude_none=True), "n_rows": len(rows),
                                           "n_invalid": n_bad},
                              "spec": spec.model_dump(mode="json")}
    log.info("eval: %s on %s (%d rows)", model, spec.eval_set.path or spec.eval_set.hub, len(rows))
    if spec.loss and not spec.prompt_field:  # a prompts-only set has no answers to score
        from curate.io import write_jsonl

        record["loss"], per_row = held_out_loss(model, spec, rows, threads)
        write_jsonl(out / "losses.jsonl", per_row)
        log.info("eval: held-out loss %.4f (ppl %.2f) over %d tokens", record["loss"]["loss"], record["loss"]["ppl"],
                 record["loss"]["n_tokens"])
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


def held_out_loss(model: str, spec: EvalSpec, rows: list[dict[str, Any]], threads: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Token-weighted loss of ``model`` on the rows' replies (the perplexity scorer, chat template), with
    its standard error and bootstrap interval over the scored rows; and the per-row losses."""
    from curate.scorers.base import ScorerContext
    from curate.scorers.perplexity import PerplexityScorer

    lm = model_params(model, spec)
    scorer = PerplexityScorer("eval_loss", {**lm.model_dump(), "template": "chat", "max_length": spec.max_length},
                              ScorerContext(torch_threads=threads))
    t0 = time.perf_counter()
    scores = scorer.score_records(rows)
    seconds = time.perf_counter() - t0
    ok = [s for s in scores if s.status in ("ok", "truncated_ok")]
    row_nll = np.array([s.values["loss"] * s.components["n_tokens"] for s in ok], dtype=float)
    row_n = np.array([s.components["n_tokens"] for s in ok], dtype=float)
    nll, n = float(row_nll.sum()), int(row_n.sum())
    forwarded = sum(s.n_tokens_used or 0 for s in ok)
    statuses: dict[str, int] = {}
    for s in scores:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    loss = nll / n if n else math.nan
    idx = stats.bootstrap_rows(len(ok), spec.bootstrap, spec.seed)
    ci = stats.interval(idx, lambda i: float(row_nll[i].sum() / row_n[i].sum()) if row_n[i].sum() else None)
    per_row = [{"id": r["sample_id"], "status": s.status, "loss": s.values.get("loss") if s.status in ("ok", "truncated_ok") else None,
                "n_tokens": s.components.get("n_tokens") if s.status in ("ok", "truncated_ok") else None} for r, s in zip(rows, scores)]
    return {"loss": loss, "ppl": math.exp(loss) if n else math.nan, "n_tokens": n, "n_rows": len(ok), "statuses": statuses,
            "se": stats.ratio_se(row_nll, row_n), "ci95": ci, "ppl_ci95": [math.exp(x) for x in ci] if ci else None,
            "bootstrap": {"n_resamples": len(idx), "seed": spec.seed},
            "seconds": seconds, "tokens_per_s": forwarded / seconds if seconds else None, "backend": lm.backend}, per_row


def _turns(row: dict[str, Any]) -> list[int]:
    """Where the model replies: at each assistant message of the row; a prompts-only row (no final
    reply) after its last message."""
    msgs = row["messages"]
    at = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if msgs[-1]["role"] != "assistant":
        at.append(len(msgs))
    return at


def _turn_prompt(row: dict[str, Any], upto: int, own: list[str]) -> list[dict[str, Any]]:
    """The messages before position ``upto``, the earlier assistant replies replaced, in order, by ``own``."""
    out, k = [], 0
    for m in row["messages"][:upto]:
        if m["role"] == "assistant":
            m = {**m, "content": own[k]}
            k += 1
        out.append(m)
    return out


def _joined(texts: list[str]) -> str:
    """Several turns' replies as one text (a single reply as it is)."""
    if len(texts) == 1:
        return texts[0]
    return "\n\n".join(f"[turn {k + 1}]\n{t}" for k, t in enumerate(texts))


def question_text(row: dict[str, Any]) -> str:
    """The request as the judge sees it: a single-turn row's user message (or the messages before the
    reply, role-labelled); a multi-turn row's messages other than the replies, each user turn numbered."""
    msgs = row["messages"]
    turns = _turns(row)
    if len(turns) == 1:
        prompt = msgs[: turns[0]]
        if len(prompt) == 1:
            return prompt[0]["content"]
        return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt)
    parts, k = [], 1
    for m in msgs:
        if m["role"] == "assistant":
            k += 1
        elif m["role"] == "user":
            parts.append(f"[user, turn {k}]\n{m['content']}")
        else:
            parts.append(f"[{m['role']}]\n{m['content']}")
    return "\n\n".join(parts)


#: reply statuses that carry a model answer (``truncated``: cut by max_tokens)
ANSWERED = ("ok", "truncated")


def _answers(backend, spec: EvalSpec, rows, calls_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each row answered turn by turn (a later turn after the model's own earlier answers); per row its
    ``turns`` (prompt, reply) and the row's ``text`` (the turns joined), ``chars``, ``status``, ``n_tokens``."""
    engine = CallEngine(backend, calls_dir)
    at = [_turns(r) for r in rows]
    got: list[list[tuple[list[dict[str, Any]], Any]]] = [[] for _ in rows]
    t0 = time.perf_counter()
    for k in range(max((len(a) for a in at), default=0)):
        todo = [i for i in range(len(rows)) if len(at[i]) > k and all(rep.status in ANSWERED for _, rep in got[i])]
        if not todo:
            break
        prompts = [_turn_prompt(rows[i], at[i][k], [rep.text for _, rep in got[i]]) for i in todo]
        for i, prompt, rep in zip(todo, prompts, engine.run([Call(p, GENERATE_REF, spec.generate) for p in prompts])):
            got[i].append((prompt, rep))
    seconds = time.perf_counter() - t0
    answers = []
    for i, turns in enumerate(got):
        failed = next((rep.status for _, rep in turns if rep.status not in ANSWERED), None)
        if failed is None and len(turns) < len(at[i]):
            failed = "error"
        status = failed or ("truncated" if any(rep.status == "truncated" for _, rep in turns) else "ok")
        texts = [rep.text for _, rep in turns]
        answers.append({"text": _joined(texts) if failed is None else None, "chars": sum(len(t) for t in texts) if failed is None else None,
                        "status": status, "n_tokens": sum(rep.n_tokens for _, rep in turns), "turns": turns})
    # an answer cut by the token limit is still the model's answer within its budget: judged, and counted
    replies = [rep for turns in got for _, rep in turns]
    made = [r for r in replies if not r.cached and r.status in ANSWERED]
    answered = [a for a in answers if a["status"] in ANSWERED]
    n_truncated = sum(a["status"] == "truncated" for a in answers)
    cut = np.array([a["status"] == "truncated" for a in answered], dtype=float)
    chars = np.array([a["chars"] for a in answered], dtype=float)
    idx = stats.bootstrap_rows(len(answered), spec.bootstrap, spec.seed)
    stats_ = {"n_ok": len(answered), "n_truncated": n_truncated, "truncated_rate": n_truncated / len(answered) if answered else None,
              "truncated_rate_se": stats.sem(cut), "truncated_rate_ci95": stats.interval(idx, lambda i: float(cut[i].mean())),
              "n_failed": len(answers) - len(answered), "n_calls": len(replies),
              "mean_tokens": sum(a["n_tokens"] for a in answers) / len(answers) if answers else 0.0,
              "avg_length": sum(a["chars"] for a in answered) / len(answered) if answered else None,
              "avg_length_se": stats.sem(chars), "avg_length_ci95": stats.interval(idx, lambda i: float(chars[i].mean())),
              "cached": engine.spent.cache_hits, "seconds": seconds,
              "tokens_per_s": sum(r.n_tokens for r in made) / seconds if made and seconds else None}
    return answers, stats_


def generate_and_judge(backend, judge, spec: EvalSpec, rows, calls_dir: Path, out: Path, threads: int) -> dict[str, Any]:
    from curate.io import write_jsonl

    answers, gen_stats = _answers(backend, spec, rows, calls_dir)
    if spec.reference == "answers":
        ref_texts = [[m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in rows]  # a canonical row ends on its reply
        references = [_joined(t) for t in ref_texts]
        ref_chars = [sum(len(x) for x in t) for t in ref_texts]
    else:
        from curate.lm import load_backend

        ref_backend = load_backend(model_params(spec.reference, spec), threads)
        ref_answers, _ = _answers(ref_backend, spec, rows, calls_dir)
        references = [a["text"] for a in ref_answers]
        ref_chars = [a["chars"] for a in ref_answers]
    known = [c for c in ref_chars if c is not None]
    gen_stats["reference_avg_length"] = sum(known) / len(known) if known else None
    log.info("eval: %d answers generated (%d calls from the cache)", gen_stats["n_ok"], gen_stats["cached"])
    todo = [i for i, (a, ref) in enumerate(zip(answers, references)) if a["status"] in ANSWERED and ref is not None]
    t0 = time.perf_counter()
    items = [(question_text(rows[i]), answers[i]["text"], references[i]) for i in todo]
    judged = judge_pairs(judge, spec.judge.mode, spec.judge.decoding, items, calls_dir)
    judge_seconds = time.perf_counter() - t0
    for i, j in zip(todo, judged):
        j["id"] = rows[i]["sample_id"]
        j["answer_chars"], j["reference_chars"] = answers[i]["chars"], ref_chars[i]
    generations = []
    for row, a, ref in zip(rows, answers, references):
        g = {"id": row["sample_id"], "prompt": a["turns"][-1][0] if a["turns"] else [], "answer": a["text"], "status": a["status"],
             "n_tokens": a["n_tokens"], "reference": ref}
        if len(_turns(row)) > 1:
            g["turns"] = [{"prompt": p, "answer": rep.text, "status": rep.status, "n_tokens": rep.n_tokens} for p, rep in a["turns"]]
        generations.append(g)
    write_jsonl(out / "generations.jsonl", generations)
    write_jsonl(out / "judgments.jsonl", judged)
    summary = summarise(judged, spec.judge.validity, spec.bootstrap, spec.seed)
    summary.update(judge=judge.fingerprint(), mode=spec.judge.mode, prompts=prompt_refs(spec.judge.mode), seconds=judge_seconds)
    if summary["valid"]:
        log.info("eval: win rate %.3f against the reference (%d judged, %d parse failures)", summary["win_rate"], summary["n_judged"],
                 summary["n_parse_failed"])
    else:
        log.warning("eval: the judge is not valid on this set, no win rate: %s", "; ".join(summary["invalid_reasons"]))
    return {"generation": gen_stats, "judge": summary}
