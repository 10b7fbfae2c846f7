"""The base of rewriters that ask a language model (Reflection-Tuning, Selective Reflection, AIDE).

An :class:`LLMRewriter` names its teacher model with the flat LM keys every scorer uses (``backend``,
``model``, ``base_url``, …; see :class:`curate.lm.LMParams`), its ``decoding`` and its ``budget``::

    rewrite:
      steps:
        - method: reflection
          backend: openai                      # or hf (default, the bundled SmolLM2) / vllm
          model: gpt-4o-mini
          base_url: https://api.openai.com/v1
          decoding: {temperature: 0, max_tokens: 1024}
          budget: {max_calls: 5000, max_cost: 20, price_input_per_mtok: 0.15, price_output_per_mtok: 0.6}

Every call goes through one :class:`curate.lm.calls.CallEngine` (cache under ``<store>/calls``,
budget caps checked before each call), so a re-run or a resumed run repeats no finished call. The
generation record of a derived row (:meth:`generation`) holds the model and, per call, its prompt id
and hash, decoding and seed, and the reply (raw output, status, token counts, retries); subclasses
add the parse status.

Rewriters whose rows take several dependent calls (AIDE's trees) write the work of each item as a
generator task and run them all with :meth:`LLMRewriter.drive`: a task yields the list of calls it
needs next and receives their replies, so every round of all tasks' pending calls is one batch for
the engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Hashable, Sequence
from typing import Any, ClassVar

from pydantic import Field

from curate.lm.calls import Budget, Call, CallEngine, Decoding, Reply
from curate.lm.spec import LMParams
from curate.prompts import Prompt
from curate.rewrite.base import Rewriter


class LLMParams(Rewriter.Params, LMParams):
    decoding: Decoding = Field(default_factory=Decoding, description="How the teacher generates (greedy by default).")
    budget: Budget = Field(default_factory=Budget, description="Caps on calls, generated tokens and cost, checked before each call.")


class LLMRewriter(Rewriter):
    """A rewriter whose rows come from a model. Subclasses list their ``prompts`` and build
    :class:`Call`\\ s with :meth:`call`; :meth:`ask` runs them."""

    Params = LLMParams
    #: every prompt the rewriter may send (their refs enter the fingerprint)
    prompts: ClassVar[tuple[Prompt, ...]] = ()

    def __init__(self, name, params=None, context=None):
        super().__init__(name, params, context)
        self._engine: CallEngine | None = None
        self._carried: list[dict[str, Any]] = []  # earlier runs' spending, added when the engine is built

    @property
    def lm(self) -> LMParams:
        return LMParams.of(self.params)

    def fingerprint(self) -> dict[str, Any]:
        from curate.lm import load_backend

        return {**super().fingerprint(), "model": load_backend(self.lm).fingerprint(), "prompts": [p.ref() for p in self.prompts]}

    @property
    def engine(self) -> CallEngine:
        """The call engine (the backend loads its model on first use)."""
        if self._engine is None:
            from curate.lm import load_backend
            from curate.store import Store

            cache = Store(self.context.store_dir).calls() if self.context.store_dir else None
            self._engine = CallEngine(load_backend(self.lm, self.context.torch_threads), cache, self.params.budget)
            for charged in self._carried:
                self._engine.spent.carry(charged)
        return self._engine

    def spending(self) -> dict[str, Any]:
        if self._engine is None:
            from curate.lm.calls import Spent

            spent = Spent()
            for charged in self._carried:
                spent.carry(charged)
            return spent.as_dict()
        return self._engine.spent.as_dict()

    def carry(self, charged: dict[str, Any]) -> None:
        if self._engine is None:  # the engine (and its model) is built only if a unit is run
            self._carried.append(dict(charged))
        else:
            self._engine.spent.carry(charged)

    def call(self, prompt: Prompt, messages: list[dict[str, Any]], seed: int | None = None, decoding: Decoding | None = None,
             attempt: int = 0, shape: dict[str, Any] | None = None) -> Call:
        """A call of ``prompt`` (already filled in ``messages``) with the step's decoding; sampled
        decoding gets ``seed`` (default: the run seed). ``attempt`` > 0 makes a retry its own call.
        The call carries the prompt's declared output ``shape`` (or the ``shape`` given, for a prompt
        whose filled text asks for more), enforced when the decoding says ``constrain``."""
        d = decoding or self.params.decoding
        if d.temperature > 0 and seed is None:
            seed = self.context.seed
        return Call(messages, prompt.ref(), d, seed if d.temperature > 0 else None, attempt,
                    shape=shape if shape is not None else prompt.shape)

    def ask(self, calls: list[Call], progress=None) -> list[Reply]:
        return self.engine.run(calls, progress)

    def drive(self, tasks: list[Generator[list[Call], list[Reply], Any]], groups: Sequence[Hashable] | None = None,
              counts: Counter | None = None) -> list[Any]:
        """Run generator ``tasks`` together. A task yields a list of :class:`Call`\\ s and is sent the
        list of their :class:`Reply`\\ s (same length, same order); what it returns is its result. Each
        round sends every pending call of every task, in task order, in one :meth:`ask` (one batch for
        the engine): the calls of all tasks that are at the same point go to the model together.
        Returns each task's return value, in task order. ``groups`` (one key per task) and ``counts``:
        ``counts[groups[i]]`` is raised by the calls of task ``i`` that were made (a reply other than
        ``budget_exhausted``, which a cap refused before the call), e.g. AIDE's calls per seed."""
        results: list[Any] = [None] * len(tasks)
        pending: dict[int, list[Call]] = {}

        def step(i: int, value):
            try:
                pending[i] = tasks[i].send(value)
            except StopIteration as stop:
                results[i] = stop.value
                pending.pop(i, None)

        for i in range(len(tasks)):
            step(i, None)
        while pending:
            order = sorted(pending)
            calls = [c for i in order for c in pending[i]]
            replies = self.ask(calls)
            k = 0
            for i in order:
                n = len(pending[i])
                got = replies[k:k + n]
                k += n
                if counts is not None and groups is not None:
                    counts[groups[i]] += sum(r.status != "budget_exhausted" for r in got)
                step(i, got)
        return results

    def generation(self, exchanges: list[tuple[str, Call, Reply]], **extra: Any) -> dict[str, Any]:
        """The generation record of a derived row: what made it and, per call (by name), its prompt
        ref, decoding and seed, and the reply (text, raw output, status, token counts, retries)."""
        fp = self.engine.backend_fingerprint
        return {"method": self.method, "version": self.version, "model": fp.get("model_id"), "backend": fp.get("backend"),
                "model_revision": fp.get("model_revision"),
                "calls": {name: {"prompt": c.prompt, "decoding": c.decoding.model_dump(mode="json"), "seed": c.seed, **r.record()}
                          for name, c, r in exchanges}, **extra}

    def budget_stats(self) -> dict[str, Any]:
        """What the engine spent (for the step's stats)."""
        return self.engine.spent.as_dict() if self._engine is not None else {}
