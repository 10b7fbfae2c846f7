"""The masked-CE engine (methods.md E6a): token log-probabilities at chosen positions, fast.

Input: sequences of token ids, each with target spans ``[start, end)`` (positions whose token is
scored; position 0 has no context and is never a target). Output per span: the sum of ``-log p``
(float64) and the token count — everything the IFD family and perplexity need.

How it is fast (the first four points change no number; the two lower-precision modes do, as measured in
bench/results/bf16_scoring.md):

- sequences are sorted by length and packed into batches under a padded-token budget (right
  padding with an attention mask), so padding is small and no row is scored twice;
- one forward of the model *body* per batch (no LM head, no hidden-state outputs, no KV cache);
- the LM head is applied only to the hidden states just before scored positions, and the
  log-softmax runs over vocabulary rows in chunks (a 262k vocabulary never materialises full
  logits), in fp32 whatever the model dtype;
- per-span sums are reduced on the device with ``index_add`` in float64; one device→host copy per
  batch; no Python loop over tokens;
- ``math="bf16"`` (``dtype: bf16-matmul``): an fp32 model whose fp32 matmuls oneDNN computes in its bf16
  math mode (:func:`curate.models.matmul_math`): on Cherry Alpaca fp32's scores within 2e-5 (relative),
  1.8–1.9× faster on an idle CPU with avx512_bf16 and no AMX;
- a bf16 (or fp16) model runs its transformer body in that dtype; with an :class:`Fp32Tail` (the hf
  backend's default) the final norm and the LM head run in fp32 — fp32 copies, applied to the upcast
  hidden states at scored positions only. Measured on Cherry Alpaca, most of what is left of bf16's
  error comes from the body's bf16 tensors, not from the head.

:class:`CompiledCE` (``runtime: openvino``) is the same engine — batches, padding, failure isolation, span
bookkeeping — with each batch's forward run by a graph compiled by OpenVINO (:mod:`curate.lm.compiled`): the same
fp32 arithmetic, torch's numbers within about 1e-5 (relative), faster on the CPUs measured.

Failures: out of memory halves the batch (and the budget for later batches) and retries; any other
error isolates the rows one by one; a row that still fails gets NaN with ``status="error"`` and the
exception class, and no other row moves.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Seq:
    """``ids``: token ids; ``spans``: [start, end) target ranges, 1 ≤ start ≤ end ≤ len(ids)."""

    ids: list[int]
    spans: list[tuple[int, int]]


@dataclass
class SeqResult:
    nll: list[float]  # per span: sum of -log p in nats (NaN on failure)
    n: list[int]  # per span: scored tokens
    status: str = "ok"
    error_class: str | None = None
    message: str | None = None
    token_logprobs: list[np.ndarray] | None = None


@dataclass
class NextToken:
    """Next-token scores after a prompt: raw ``logits`` of the candidate tokens (float64) and the
    full-vocabulary ``lse`` (so ``exp(logits - lse)`` are full-softmax probabilities; backends that
    return log-probabilities give ``lse = 0``)."""

    logits: np.ndarray
    lse: float
    status: str = "ok"
    error_class: str | None = None
    message: str | None = None

    @property
    def probs(self) -> np.ndarray:
        """Full-vocabulary probabilities of the candidates."""
        return np.exp(self.logits - self.lse)


@dataclass
class EnginePlan:
    """What the engine did: batches run, OOM halvings, final budget (recorded in components)."""

    max_tokens_per_batch: int
    batches: int = 0
    oom_splits: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    scored_tokens: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Fp32Tail:
    """fp32 copies of a low-precision model's last steps: ``head`` (the LM head) and ``norm`` (the final
    norm, or None to keep the model's own); ``norm_name``: the body's attribute holding that norm."""

    head: object
    norm: object | None = None
    norm_name: str | None = None


FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm")


def fp32_tail(model, norm: bool = True) -> Fp32Tail:
    """An :class:`Fp32Tail` for a transformers causal LM (``norm``: the final norm too, when the body
    names it as one of :data:`FINAL_NORM_NAMES`). The copies cost vocabulary × hidden × 4 bytes (113 MB
    for SmolLM2-135M)."""
    import copy

    import torch

    body = model.get_decoder()
    name = next((n for n in FINAL_NORM_NAMES if norm and isinstance(getattr(body, n, None), torch.nn.Module)), None)
    head = copy.deepcopy(model.get_output_embeddings()).float().eval()
    return Fp32Tail(head, copy.deepcopy(getattr(body, name)).float().eval() if name else None, name)


def _logsumexp_(x):
    """log Σ exp over the last dim, overwriting ``x`` (a chunk of logits we own): no temporary of the
    chunk's size, about 1.5× faster than ``torch.logsumexp`` on CPU, the same value in fp32."""
    m = x.amax(dim=-1, keepdim=True)
    return x.sub_(m).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (type(exc).__name__ in ("OutOfMemoryError", "MemoryError") or "out of memory" in text or "can't allocate memory" in text
            or "bad_alloc" in text or "cannot allocate memory" in text)


def plan_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches: longest first, each batch's padded size ≤ max_tokens
    (a sequence longer than the budget runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if cur and w * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


class MaskedCE:
    """Scores :class:`Seq` items with a causal LM split into ``body`` and ``head``."""

    def __init__(self, body, head, pad_id: int, device, max_tokens_per_batch: int = 8192,
                 logit_softcap: float | None = None, head_chunk_bytes: int = 24 << 20, fp32_tail: Fp32Tail | None = None,
                 math: str = "ieee"):
        self.body = body
        self.math = math  # the CPU's fp32 matmul math during forwards: "ieee" or "bf16" (curate.models.matmul_math)
        self.head = head if fp32_tail is None else fp32_tail.head
        self.tail = fp32_tail
        self.pad_id = int(pad_id)
        self.device = device
        self.plan = EnginePlan(max_tokens_per_batch)
        self.softcap = logit_softcap
        self.vocab = int(head.weight.shape[0])
        self.chunk_rows = max(16, head_chunk_bytes // (4 * self.vocab))

    @classmethod
    def for_model(cls, model, pad_id: int, device, max_tokens_per_batch: int = 8192, fp32_tail: Fp32Tail | None = None,
                  math: str = "ieee") -> MaskedCE:
        """``fp32_tail``: run the final norm and LM head in fp32 after a low-precision body (:func:`fp32_tail`);
        ``math``: the CPU's fp32 matmul math (``bf16``: oneDNN's bf16 math mode)."""
        cap = getattr(model.config, "final_logit_softcapping", None)
        return cls(model.get_decoder(), model.get_output_embeddings(), pad_id, device, max_tokens_per_batch, cap, fp32_tail=fp32_tail,
                   math=math)

    # -- public -----------------------------------------------------------------------------------
    def score(self, seqs: list[Seq], token_logprobs: bool = False, progress=None) -> list[SeqResult]:
        for s in seqs:
            for a, b in s.spans:
                if not (1 <= a <= b <= len(s.ids)):
                    raise ValueError(f"bad target span ({a}, {b}) for a sequence of {len(s.ids)} tokens")

        def failed(s: Seq, exc: BaseException) -> SeqResult:
            return SeqResult([float("nan")] * len(s.spans), [0] * len(s.spans), "error", type(exc).__name__, str(exc)[:500])

        return self._run_all(seqs, lambda batch: self._forward(batch, token_logprobs), failed, progress)

    def next_token(self, prompts: list[list[int]], candidates: list[int], progress=None) -> list[NextToken]:
        """Rating-token engine (E6b): the logits of ``candidates`` at the position after each prompt,
        and the full-vocabulary log-sum-exp there — one batched forward, the head on one row per prompt."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("next_token: an empty prompt has no position to score after")
        seqs = [Seq(list(p), []) for p in prompts]
        cand = list(candidates)

        def failed(s: Seq, exc: BaseException) -> NextToken:
            return NextToken(np.full(len(cand), np.nan), float("nan"), "error", type(exc).__name__, str(exc)[:500])

        return self._run_all(seqs, lambda batch: self._forward_last(batch, cand), failed, progress)

    def _run_all(self, seqs, forward, failed, progress):
        results: list = [None] * len(seqs)
        for batch in plan_batches([len(s.ids) for s in seqs], self.plan.max_tokens_per_batch):
            self._run(seqs, batch, results, forward, failed)
            if progress is not None:
                progress.advance(len(batch))
        return results

    def body_only(self, seqs: list[Seq]) -> None:
        """The same batches through the body alone (the efficiency baseline of the benchmark)."""
        import torch

        from curate.models import matmul_math

        with torch.inference_mode(), matmul_math(self.math, self.device):
            for batch in plan_batches([len(s.ids) for s in seqs], self.plan.max_tokens_per_batch):
                ids, mask = self._pad([seqs[i] for i in batch])
                self.body(input_ids=ids, attention_mask=mask, use_cache=False)

    # -- internals --------------------------------------------------------------------------------
    def _math_block(self):
        """The block each batch runs in: torch's fp32 matmul math set to :attr:`math` (:func:`curate.models.matmul_math`)."""
        from curate.models import matmul_math

        return matmul_math(self.math, self.device)

    def _run(self, seqs, batch, results, forward, failed) -> None:
        try:
            with self._math_block():
                out = forward([seqs[i] for i in batch])
        except Exception as exc:  # noqa: BLE001 - every failure becomes a per-row status
            if len(batch) == 1:
                results[batch[0]] = failed(seqs[batch[0]], exc)
                return
            if _is_oom(exc):
                self.plan.oom_splits += 1
                self.plan.max_tokens_per_batch = max(1, self.plan.max_tokens_per_batch // 2)
                self.plan.notes.append(f"out of memory on a batch of {len(batch)}: budget halved to {self.plan.max_tokens_per_batch}")
                self._empty_cache()
                half = len(batch) // 2
                self._run(seqs, batch[:half], results, forward, failed)
                self._run(seqs, batch[half:], results, forward, failed)
            else:  # isolate the failing row(s); the others are scored normally
                for i in batch:
                    self._run(seqs, [i], results, forward, failed)
            return
        for i, r in zip(batch, out):
            results[i] = r

    def _empty_cache(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _pad(self, seqs: list[Seq]):
        import torch

        ids, mask = _right_padded(seqs, self.pad_id)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    def _hidden(self, ids, mask):
        """The body's last hidden states (batch × width × hidden); with an fp32 final norm, the states
        before the body's own norm (a forward hook passes its input through)."""
        norm = getattr(self.body, self.tail.norm_name) if self.tail is not None and self.tail.norm is not None else None
        handle = None if norm is None else norm.register_forward_hook(_pass_input, with_kwargs=True)
        try:
            return self.body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        finally:
            if handle is not None:
                handle.remove()

    def _tail(self, states):
        """Gathered hidden states (n × hidden) as the head takes them: upcast and normed in fp32 with an
        :class:`Fp32Tail`, else as they are."""
        if self.tail is None:
            return states
        states = states.float()
        return self.tail.norm(states) if self.tail.norm is not None else states

    def _forward_last(self, seqs: list[Seq], candidates: list[int]) -> list[NextToken]:
        import torch

        ids, mask = self._pad(seqs)
        last = torch.tensor([len(s.ids) - 1 for s in seqs], device=self.device)
        with torch.inference_mode():
            hidden = self._hidden(ids, mask)
            states = self._tail(hidden[torch.arange(len(seqs), device=self.device), last])
            logits = self.head(states).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            lse = torch.logsumexp(logits, dim=-1).double().cpu().numpy()
            cand = logits[:, torch.tensor(candidates, device=self.device)].double().cpu().numpy()
        self._count(int(ids.numel()), int(mask.sum()))
        return [NextToken(cand[r], float(lse[r])) for r in range(len(seqs))]

    def _forward(self, seqs: list[Seq], token_logprobs: bool) -> list[SeqResult]:
        import torch

        ids, mask = self._pad(seqs)
        rows, pos, seg, n_spans = _targets(seqs)
        rows_t, pos_t, seg_t = (torch.from_numpy(a).to(self.device) for a in (rows, pos, seg))
        with torch.inference_mode():
            hidden = self._hidden(ids, mask)
            states = self._tail(hidden[rows_t, pos_t - 1])  # the state before each target predicts it
            labels = ids[rows_t, pos_t]
            lp = torch.empty(len(labels), dtype=torch.float32, device=self.device)
            for c in range(0, len(labels), self.chunk_rows):
                logits = self.head(states[c : c + self.chunk_rows]).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                target = logits.gather(1, labels[c : c + self.chunk_rows, None]).squeeze(1)
                lp[c : c + self.chunk_rows] = target - _logsumexp_(logits)
            sums = torch.zeros(n_spans, dtype=torch.float64, device=self.device).index_add_(0, seg_t, lp.double())
            sums_np = (-sums).cpu().numpy()
            lp_np = lp.cpu().numpy() if token_logprobs else None
        self._count(int(ids.numel()), int(mask.sum()), len(labels))
        return _results(seqs, sums_np, lp_np)

    def _count(self, padded: int, real: int, scored: int = 0) -> None:
        self.plan.batches += 1
        self.plan.padded_tokens += padded
        self.plan.real_tokens += real
        self.plan.scored_tokens += scored


class CompiledCE(MaskedCE):
    """The engine over a compiled graph (``runtime: openvino``, :mod:`curate.lm.compiled`): the same batches, padding,
    failure isolation, out-of-memory halving and span bookkeeping as :class:`MaskedCE`; each batch is one inference that
    returns the scored tokens' logits and log-sum-exp (fp32), summed per span in float64 here."""

    def __init__(self, graph, pad_id: int, max_tokens_per_batch: int = 2048):
        self.graph = graph
        self.request = graph.request()  # one per engine: an engine runs one batch at a time
        self.math = "ieee"
        self.tail = None
        self.pad_id = int(pad_id)
        self.device = "cpu"
        self.plan = EnginePlan(max_tokens_per_batch)

    def body_only(self, seqs: list[Seq]) -> None:
        raise NotImplementedError("the compiled graph has no body-only entry (the benchmark's baseline is the torch engine's)")

    def _math_block(self):
        return nullcontext()

    def _empty_cache(self) -> None:
        pass

    def _pad(self, seqs: list[Seq]):
        ids, mask = _right_padded(seqs, self.pad_id)
        _check_ids(ids, self.graph.vocab)
        return ids, mask

    def _forward(self, seqs: list[Seq], token_logprobs: bool) -> list[SeqResult]:
        from curate.lm.compiled import run

        ids, mask = self._pad(seqs)
        rows, pos, seg, n_spans = _targets(seqs)
        idx = rows * ids.shape[1] + pos - 1  # the state before each target predicts it
        labels = ids[rows, pos]
        if len(idx):
            logits, lse = run(self.request, ids, idx, labels[:, None])
            lp = logits[:, 0] - lse
        else:
            lp = np.zeros(0, dtype=np.float32)
        sums = np.zeros(n_spans, dtype=np.float64)
        np.add.at(sums, seg, lp.astype(np.float64))
        self._count(int(ids.size), int(mask.sum()), len(labels))
        return _results(seqs, -sums, lp if token_logprobs else None)

    def _forward_last(self, seqs: list[Seq], candidates: list[int]) -> list[NextToken]:
        from curate.lm.compiled import run

        ids, mask = self._pad(seqs)
        idx = np.array([r * ids.shape[1] + len(s.ids) - 1 for r, s in enumerate(seqs)], dtype=np.int64)
        cand = np.tile(np.asarray(candidates, dtype=np.int64), (len(seqs), 1))
        _check_ids(cand, self.graph.vocab)
        logits, lse = run(self.request, ids, idx, cand)
        self._count(int(ids.size), int(mask.sum()))
        return [NextToken(logits[r].astype(np.float64), float(lse[r])) for r in range(len(seqs))]


def _right_padded(seqs: list[Seq], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's token ids (rows × longest, int64, right-padded with ``pad_id``) and its 0/1 mask of real tokens."""
    width = max(len(s.ids) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s.ids)] = s.ids
        mask[r, : len(s.ids)] = 1
    return ids, mask


def _check_ids(ids: np.ndarray, vocab: int) -> None:
    """Raise ``IndexError`` (as torch's embedding does) for a token id outside [0, vocab): the compiled graph would look
    it up without a word."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise IndexError(f"token id {int(ids.max() if ids.max() >= vocab else ids.min())} is outside the model's vocabulary of {vocab}")


def _targets(seqs: list[Seq]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per scored token of a batch (spans in order): its row, its position, its span's number; and the span count."""
    rows, pos, seg = [], [], []
    n_spans = 0
    for r, s in enumerate(seqs):
        for a, b in s.spans:
            rows.append(np.full(b - a, r, dtype=np.int64))
            pos.append(np.arange(a, b, dtype=np.int64))
            seg.append(np.full(b - a, n_spans, dtype=np.int64))
            n_spans += 1
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(rows), cat(pos), cat(seg), n_spans


def _results(seqs: list[Seq], nll: np.ndarray, lp: np.ndarray | None) -> list[SeqResult]:
    """One :class:`SeqResult` per sequence from the batch's per-span ``nll`` sums (and per-token log-probs, if kept)."""
    out, k, off = [], 0, 0
    for s in seqs:
        ns = [b - a for a, b in s.spans]
        tl = None
        if lp is not None:
            tl = []
            for n in ns:
                tl.append(lp[off : off + n].copy())
                off += n
        out.append(SeqResult([float(x) for x in nll[k : k + len(ns)]], ns, token_logprobs=tl))
        k += len(ns)
    return out


def _pass_input(module, args, kwargs, output):
    """A forward hook that makes a module the identity (its input, positional or keyword, is its output)."""
    return args[0] if args else next(iter(kwargs.values()))
