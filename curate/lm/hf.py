"""transformers backend: the model in this process, on CPU or GPU, through the masked-CE engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from curate.errors import CurateError
from curate.lm.base import resolve_device, resolve_dtype, resolve_runtime
from curate.lm.engine import CompiledCE, EnginePlan, MaskedCE, NextToken, Seq, SeqResult, fp32_tail
from curate.lm.spec import LMParams
from curate.models import (add_adapter_stop_tokens, cached, is_gguf, load_causal_lm, matmul_math, model_revision, resolve_model,
                           set_torch_threads)


class HFBackend:
    name = "hf"

    #: What runs in fp32 after a bf16/fp16 body (:func:`~curate.lm.engine.fp32_tail`): ``norm+head`` (the
    #: final norm and the LM head, at scored positions; bf16 then ranks like fp32), ``head``, or ``none``
    #: (everything in the model's dtype but the log-sum-exp). A switch for bench/bf16_scoring.py.
    fp32_parts: str = "norm+head"

    def __init__(self, params: LMParams, torch_threads: int | None = None):
        self.params = params
        self.torch_threads = torch_threads
        self._resolved = None
        self._dtype: tuple[str, str] | None = None
        self._runtime: tuple[str, str] | None = None
        self.last_plan: EnginePlan | None = None

    @property
    def resolved(self):
        if self._resolved is None:
            self._resolved = resolve_model(self.params.model, self.params.revision)
        return self._resolved

    @property
    def runtime_choice(self) -> tuple[str, str]:
        """(runtime, why): what runs scoring forwards, ``runtime: auto`` resolved once for this backend (:func:`resolve_runtime`)."""
        if self._runtime is None:
            self._runtime = resolve_runtime(self.params.runtime, self.params.dtype, self.params.device)
        return self._runtime

    @property
    def dtype_choice(self) -> tuple[str, str]:
        """(dtype, why): ``dtype: auto`` resolved once for this backend (:func:`resolve_dtype`; ``bf16-matmul``: fp32 weights;
        with ``runtime`` openvino: float32, the reason naming the runtime's)."""
        if self._dtype is None:
            runtime, why = self.runtime_choice
            if runtime == "openvino":
                self._dtype = ("float32", f"runtime openvino ({why}) runs float32" if self.params.dtype == "auto"
                               else f"set in the flow; runtime openvino ({why})" if why.startswith("auto") else "set in the flow")
            else:
                dtype, reason = resolve_dtype(self.params.dtype, self.params.device)
                self._dtype = (dtype, f"{reason}; runtime torch ({why})" if why.startswith("auto") else reason)
        return self._dtype

    @property
    def low_precision(self) -> bool:
        """The weights are bf16/fp16 (``bf16-matmul`` keeps fp32 weights: only the CPU's matmul math changes)."""
        return self.dtype_choice[0] in ("bfloat16", "float16")

    @property
    def math(self) -> str:
        """The CPU's fp32 matmul math for this model's forwards (:func:`curate.models.matmul_math`)."""
        return "bf16" if self.dtype_choice[0] == "bf16-matmul" else "ieee"

    def fingerprint(self) -> dict[str, Any]:
        p = self.params
        fp = {"backend": self.name, "model_id": p.model, "model_revision": model_revision(p.model, p.revision),
              "tokenizer_id": p.tokenizer or p.model, "dtype": self.dtype_choice[0],
              "quantization": "gguf-dequantized-fp32" if is_gguf(p.model) else None}
        if self.low_precision:  # a bf16/fp16 body's numbers depend on what runs in fp32 after it (other keys: as before)
            fp["fp32_parts"] = self.fp32_parts
        if self.runtime_choice[0] != "torch":  # its numbers agree with torch's to ~1e-5, not bit for bit (torch's keys: as before)
            fp["runtime"] = self.runtime_choice[0]
        return fp

    @property
    def tokenizer(self):
        from transformers import AutoTokenizer

        r = self.resolved
        where = self.params.tokenizer or r.location
        return cached(("lm-tokenizer", where, r.revision), lambda: AutoTokenizer.from_pretrained(
            where, trust_remote_code=self.params.trust_remote_code, revision=self.params.revision if r.source == "hub" else None))

    @property
    def device(self) -> str:
        return resolve_device(self.params.device)

    @property
    def model(self):
        import torch

        r, p = self.resolved, self.params
        dtype = "float32" if self.dtype_choice[0] == "bf16-matmul" else self.dtype_choice[0]  # weights
        set_torch_threads(self.torch_threads)

        def load():
            m = load_causal_lm(r.location, getattr(torch, dtype), p.trust_remote_code, p.revision if r.source == "hub" else None)
            add_adapter_stop_tokens(m, r.location)
            return m.to(self.device).eval()

        return cached(("lm", r.location, r.revision, dtype, self.device, p.trust_remote_code), load)

    def engine(self) -> MaskedCE:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        if self.runtime_choice[0] == "openvino":
            graph = self.compiled_graph()
            return CompiledCE(graph, pad, self._engine_budget(graph.vocab))
        model, r = self.model, self.resolved
        fp32 = None
        if self.fp32_parts != "none" and self.low_precision:  # made once per model, like the model
            fp32 = cached(("lm-fp32-tail", r.location, r.revision, self.dtype_choice[0], self.device, self.params.trust_remote_code,
                           self.fp32_parts), lambda: fp32_tail(model, norm=self.fp32_parts == "norm+head"))
        return MaskedCE.for_model(model, pad, self.device, self.token_budget, fp32_tail=fp32, math=self.math)

    def compiled_graph(self):
        """The model's forward exported once (:func:`curate.lm.compiled.graph_folder`: a torch copy of the model is loaded
        only to export it, and dropped after) and compiled once per process and thread count. An export or compile that
        failed is not tried again in this process: the same :class:`~curate.errors.CurateError` is raised at once (the
        scoring step stops with it, naming ``runtime: torch`` as the way out)."""
        import torch

        from curate.lm.compiled import CompiledGraph, graph_folder

        r, p = self.resolved, self.params
        threads = set_torch_threads(self.torch_threads)  # OpenVINO gets torch's count (default min(2, CPUs))

        def build():
            try:
                folder = graph_folder(r.location, r.revision, lambda: load_causal_lm(
                    r.location, torch.float32, p.trust_remote_code, p.revision if r.source == "hub" else None))
                return CompiledGraph(folder, threads)
            except Exception as exc:  # noqa: BLE001 - kept, so later calls fail fast with the same message
                return CurateError(f"runtime: openvino could not export or compile {p.model}: {type(exc).__name__}: {exc} "
                                   "(set runtime: torch to score with torch)")

        graph = cached(("lm-compiled", r.location, r.revision, threads), build)
        if isinstance(graph, Exception):
            raise graph
        return graph

    def _engine_budget(self, vocab: int) -> int:
        """The compiled engine's padded-token budget: :attr:`token_budget`, but (unless set in the flow) at most what keeps
        a batch's scored logits (tokens × vocabulary × 4 bytes, twice: the logits and their exponentials) under 1 GiB —
        the graph materialises them, where the torch engine works in chunks: 2048 for a 49k vocabulary, 512 for 262k."""
        if self.params.max_tokens_per_batch:
            return self.params.max_tokens_per_batch
        return max(128, min(self.token_budget, (1 << 30) // (8 * vocab)))

    @property
    def token_budget(self) -> int:
        """Padded tokens per forward batch: ``max_tokens_per_batch``, else 2048 on CPU (larger budgets
        measured slower there, for scoring and for greedy generation) and 16384 on GPU."""
        return self.params.max_tokens_per_batch or (2048 if self.device == "cpu" else 16384)

    def score(self, seqs: list[Seq], token_logprobs: bool = False, progress=None) -> list[SeqResult]:
        set_torch_threads(self.torch_threads)
        engine = self.engine()
        out = engine.score(seqs, token_logprobs=token_logprobs, progress=progress)
        self.last_plan = engine.plan
        return out

    def next_token(self, prompts: list[list[int]], candidates: list[int], progress=None) -> list[NextToken]:
        set_torch_threads(self.torch_threads)
        engine = self.engine()
        out = engine.next_token(prompts, candidates, progress=progress)
        self.last_plan = engine.plan
        return out

    def chat(self, conversations: list[list[dict]], decoding: dict, seeds: list[int] | None = None, progress=None,
             prefix: str = "", shapes: list[dict | None] | None = None) -> list[dict]:
        """Reply to each conversation (rendered by :func:`chat_prompt_ids`). ``prefix`` starts the
        reply; the returned text includes it. ``shapes`` (one per conversation; None: free text) limit
        each reply to its regex or JSON schema (:meth:`constraints`: xgrammar masks the tokens the shape
        does not allow at each step); those rows say ``constrained: True``."""
        tok = self.tokenizer
        constraints = self.constraints(shapes, prefix) if shapes is not None and any(s is not None for s in shapes) else None
        out = self.generate([chat_prompt_ids(tok, conv, prefix) for conv in conversations], decoding, seeds, progress, constraints)
        for i, o in enumerate(out):
            if o["text"] is not None:
                o["text"] = prefix + o["text"]
            if shapes is not None:
                o["constrained"] = True if shapes[i] is not None else None
        return out

    def constraints(self, shapes: list[dict | None], prefix: str = "") -> list[Constraint | None]:
        """A :class:`Constraint` per shape (None stays None): each shape is compiled once per process
        and model. Raises :class:`~curate.errors.CurateError` for an unknown shape type, or when
        ``prefix`` (the reply's start) cannot begin a reply of that shape."""
        from curate.errors import require

        xgr = require("xgrammar", "decoding.constrain on the hf backend", XGRAMMAR_INSTALL)
        r = self.resolved
        tok, model, eos = self.tokenizer, self.model, self._eos_ids()
        vocab = model.get_output_embeddings().weight.shape[0]

        def compiler():
            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=eos)
            return xgr.GrammarCompiler(info, max_threads=max(1, self.torch_threads or 1))

        comp = cached(("xgrammar-compiler", r.location, r.revision, vocab), compiler)
        out: list[Constraint | None] = []
        for shape in shapes:
            if shape is None:
                out.append(None)
                continue
            key = json.dumps(shape, sort_keys=True)
            grammar = cached(("xgrammar-grammar", r.location, r.revision, vocab, key), lambda: compile_shape(comp, shape))
            if prefix and not xgr.GrammarMatcher(grammar).accept_string(prefix):
                raise CurateError(f"decoding.constrain: the answer prefix {prefix!r} cannot start a reply of the shape {key[:200]}; "
                                  "change the prefix (or set it to '') or turn constrain off")
            out.append(Constraint(grammar, prefix, vocab))
        return out

    def generate(self, prompts: list[list[int]], decoding: dict, seeds: list[int] | None = None, progress=None,
                 constraints: list[Constraint | None] | None = None) -> list[dict]:
        """Continuations of token-id prompts: ``{"text", "n_tokens", "status"}`` per prompt, in order.

        Greedy (temperature 0): prompts are sorted by length (longest first) and generated in
        left-padded batches of at most :attr:`token_budget` padded prompt tokens; each row ends at its
        own end-of-sequence token. A batch that raises (out of memory included) is split in halves down to single rows,
        so a failing row gets ``status="error"`` and no other row moves. Sampled (temperature > 0):
        one prompt at a time with its own seed, so a row's text depends on nothing but its prompt
        and seed — HF ``generate`` draws from one global generator, so batched rows would share it.
        ``constraints`` (one per prompt, None: free) limit each row's tokens to its grammar.
        """
        set_torch_threads(self.torch_threads)
        max_new = int(decoding.get("max_tokens", 128))
        temperature = float(decoding.get("temperature", 0.0))
        if temperature > 0:
            kwargs = dict(do_sample=True, temperature=temperature, top_p=float(decoding.get("top_p", 1.0)),
                          top_k=int(decoding.get("top_k", 0)))
            batches = [[i] for i in range(len(prompts))]
        else:
            kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            batches = greedy_batches([len(p) for p in prompts], self.token_budget)
        kwargs.update(max_new_tokens=max_new, pad_token_id=self._pad_id(), eos_token_id=self._eos_ids())
        if decoding.get("stop"):  # a row stops once its new text holds one (the call engine cuts the text there)
            kwargs["stop"] = [s for s in decoding["stop"] if s]
        out: list[dict | None] = [None] * len(prompts)
        for batch in batches:
            seed = (int(seeds[batch[0]]) if seeds else 0) if temperature > 0 else None
            cons = [constraints[i] for i in batch] if constraints else None
            for i, res in zip(batch, self._generate_rows([prompts[i] for i in batch], kwargs, seed, cons)):
                out[i] = res
            if progress is not None:
                progress.advance(len(batch))
        return out

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return [eos] if isinstance(eos, int) else list(eos)

    def _generate_rows(self, rows: list[list[int]], kwargs: dict, seed: int | None, cons: list | None = None) -> list[dict]:
        """Generate ``rows`` as one batch; on any exception split it in halves (single rows fail alone)."""
        try:
            return self._generate_batch(rows, kwargs, seed, cons)
        except Exception as exc:  # noqa: BLE001 - a failed row becomes its own status
            if len(rows) == 1:
                return [{"text": None, "n_tokens": 0, "status": "error", "error_class": type(exc).__name__, "message": str(exc)[:500]}]
        half = len(rows) // 2
        c1, c2 = (cons[:half], cons[half:]) if cons else (None, None)
        return self._generate_rows(rows[:half], kwargs, seed, c1) + self._generate_rows(rows[half:], kwargs, seed, c2)

    def _generate_batch(self, rows: list[list[int]], kwargs: dict, seed: int | None, cons: list | None = None) -> list[dict]:
        """One ``generate`` call over left-padded rows; each row's new tokens end at its first EOS."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), kwargs["pad_token_id"], dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(kwargs)
        stop = kwargs.pop("stop", None) or []
        if stop:
            kwargs["stopping_criteria"] = StopInNewText.make(self.tokenizer, stop, width)
        if cons and any(c is not None for c in cons):
            kwargs["logits_processor"] = GrammarMask.make(cons)
        with torch.inference_mode(), matmul_math(self.math, self.device):
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        eos = set(kwargs["eos_token_id"])
        out = []
        for new in gen[:, width:].tolist():
            end = next((j + 1 for j, t in enumerate(new) if t in eos), None)
            text = self.tokenizer.decode(new[:end], skip_special_tokens=True)
            if end is not None:
                reason = "stop"  # its end-of-sequence token
            else:  # no EOS: it ended at a stop string, or ran out of max_new_tokens
                end = len(new)
                hit = any(s in text for s in stop)
                reason = "stop" if hit or end < kwargs["max_new_tokens"] else "length"
            out.append({"text": text, "n_tokens": end, "status": "ok", "finish_reason": reason})
        return out


class StopInNewText:
    """Ends a row once its *generated* text holds a stop string. (HF's own ``stop_strings`` look at
    the whole sequence, so a stop string straddling the end of the prompt — ``"\nThe"`` after the
    chat template's ``assistant\n`` — ended a reply after one token, which no API does.) Only the
    last few new tokens are decoded at each step: a stop string first appears ending in the newest
    token. Built by :meth:`make` (a ``transformers.StoppingCriteria``, imported only then)."""

    def __init__(self, tokenizer, stop: list[str], width: int):
        self.tokenizer, self.stop, self.width = tokenizer, stop, width
        self.tail = max(len(s) for s in stop) + 2  # tokens: each decodes to at least one character

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        tails = self.tokenizer.batch_decode(input_ids[:, self.width:][:, -self.tail:].tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in tails], dtype=torch.bool, device=input_ids.device)

    @classmethod
    def make(cls, tokenizer, stop: list[str], width: int):
        from transformers import StoppingCriteria, StoppingCriteriaList

        criterion = type("StopInNewTextCriteria", (cls, StoppingCriteria), {})(tokenizer, stop, width)
        return StoppingCriteriaList([criterion])


XGRAMMAR_INSTALL = "pip install 'curate[constrained]'  (xgrammar)"


@dataclass(frozen=True)
class Constraint:
    """One row's output grammar (an ``xgrammar.CompiledGrammar``), the reply's prefix already in the
    prompt (fed to the grammar first), and the logits' vocabulary size."""

    grammar: Any
    prefix: str
    vocab: int


def compile_shape(compiler, shape: dict):
    """An ``xgrammar.CompiledGrammar`` for a declared output shape (:data:`curate.prompts.SHAPES`):
    ``{"type": "regex", "pattern"}`` or ``{"type": "json_schema", "schema"}`` (compact JSON: no free
    whitespace, so a model cannot fill its tokens with blanks)."""
    from curate.lm.shapes import check

    if check(shape) == "regex":
        return compiler.compile_regex(shape["pattern"])
    return compiler.compile_json_schema(json.dumps(shape["schema"]), any_whitespace=False)


class GrammarMask:
    """Limits each constrained row's next token to those its grammar allows after what the row has
    generated (xgrammar's token bitmask); rows without a constraint are left alone, and so is a row
    once its grammar has ended or once it stopped some other way (a stop string: padding follows).
    Built by :meth:`make` (a ``transformers.LogitsProcessor``, imported only then)."""

    def __init__(self, cons: list[Constraint | None]):
        import xgrammar as xgr

        self.xgr = xgr
        self.matchers = []
        for c in cons:
            m = None if c is None else xgr.GrammarMatcher(c.grammar)
            if m is not None and c.prefix:
                m.accept_string(c.prefix)
            self.matchers.append(m)
        vocab = next(c.vocab for c in cons if c is not None)
        self.mask = xgr.allocate_token_bitmask(len(cons), vocab)
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started:  # the token each row took last step
            last = input_ids[:, -1].tolist()
            for i, m in enumerate(self.matchers):
                if m is not None and not m.is_terminated() and not m.accept_token(last[i]):
                    self.matchers[i] = None
        self.started = True
        rows = [i for i, m in enumerate(self.matchers) if m is not None and not m.is_terminated()]
        if rows:
            for i in rows:
                self.matchers[i].fill_next_token_bitmask(self.mask, i)
            if scores.device.type == "cpu":
                self.xgr.apply_token_bitmask_inplace(scores, self.mask, indices=rows)
            else:
                self.xgr.apply_token_bitmask_inplace(scores, self.mask.to(scores.device), indices=rows)
        return scores

    @classmethod
    def make(cls, cons: list[Constraint | None]):
        from transformers import LogitsProcessor, LogitsProcessorList

        return LogitsProcessorList([type("GrammarMaskProcessor", (cls, LogitsProcessor), {})(cons)])


def greedy_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices grouped for left-padded generation: longest first (ties by index), each group's
    ``rows × longest prompt`` within ``budget`` padded tokens (a prompt longer than it runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def chat_prompt_ids(tok, conversation: list[dict], prefix: str = "") -> list[int]:
    """Token ids of ``conversation`` as a reply prompt: the tokenizer's chat template with the
    assistant cue, then ``prefix``; a tokenizer without a chat template gets ``role: content``
    blocks and an ``assistant:`` cue (with its special tokens)."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) + prefix
        return tok(text, add_special_tokens=False)["input_ids"]
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in conversation) + "\n\nassistant: " + prefix
    return tok(text)["input_ids"]
