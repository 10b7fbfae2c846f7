"""The rewriter contract: rewriters make new rows from selected ones (methods.md Part C).

A rewriter is a plug-in (:mod:`curate.plugin`): one file in ``curate/rewrite/`` plus one line in
``REWRITERS`` (``curate/rewrite/__init__.py``), built as ``cls(name, params, context: RewriteContext)``
with validated ``Params`` and optional ``requires``. It never changes a row in place: it returns *derived* rows, each
with its ``parents`` (sample_ids), its ``origin`` (``<method>:<variant>``) and a ``generation``
record (what made it: method, version and seed; an LLM rewriter adds its prompt id and hash, model,
decoding, raw output and parse status), and says what became of every input row::

    class Upper(Rewriter):
        method = "upper"
        version = "1.0"

        def run_unit(self, unit, records):
            out = UnitResult()
            for r in records:
                msgs = [{**m, "content": m["content"].upper()} for m in r["messages"]]
                out.derive(msgs, parents=[r["sample_id"]], variant="upper", generation={})
            return out

A unit's ``stats`` are kept with the step; ``stats["rejected"]`` (``{reason: count}``) counts what the
rewriter produced but did not emit (a failed grader, a duplicate), and the report lists it beside the
input rows' dispositions.

Work is split into *units* (``units()``; default one unit): the stage stores each finished unit's
result under the rewriter's key in the store, so a re-run recomputes nothing and a killed run loses
at most the unit in flight. Units must be independent of each other and deterministic given the
parameters (seeds derive from the run seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from curate.plugin import Context, Plugin
from curate.records import canonical_json, sha256_hex

#: what a rewrite did with one of its input rows
Disposition = Literal["used", "passthrough", "dropped"]


@dataclass
class Derived:
    """One new row: chat messages (canonical roles), its parents, variant and generation record."""

    messages: list[dict[str, Any]]
    parents: list[str]
    variant: str
    generation: dict[str, Any]
    tools: str | None = None
    original: dict[str, Any] | None = None  # the rewriter's own output record (e.g. {instruction, output, count})


@dataclass
class UnitResult:
    """A unit's derived rows (in order) and a disposition per input row it saw (sample_id -> (what, reason, detail))."""

    derived: list[Derived] = field(default_factory=list)
    dispositions: dict[str, tuple[Disposition, str | None, str | None]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def derive(self, messages, parents, variant, generation, tools=None, original=None) -> None:
        self.derived.append(Derived(messages, list(parents), variant, generation, tools, original))
        for p in parents:
            if self.dispositions.get(p, ("",))[0] != "used":
                self.dispositions[p] = ("used", None, None)


@dataclass
class RewriteContext(Context):
    """What a rewriter may need from the run: ``seed`` (in its key), ``torch_threads``, ``base_dir``,
    ``store_dir`` (where LLM rewriters cache their calls; None: no cache) and in ``extra`` the flow's
    ``embed`` spec (AIDE dedups and picks personas with it)."""


class Rewriter(Plugin):
    kind = "rewriter"
    context_type = RewriteContext
    context: RewriteContext

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the derived rows (models and prompts are added by subclasses)."""
        return {"method": self.method, "rewriter_version": self.version, "params": self.params.model_dump(mode="json"),
                "seed": self.context.seed}

    @property
    def key(self) -> str:
        return sha256_hex(canonical_json(self.fingerprint()))

    def units(self, n_records: int) -> list[str]:
        """Names of independent units of work over the whole input (default: one)."""
        return ["all"]

    def run_unit(self, unit: str, records: list[dict[str, Any]]) -> UnitResult:
        raise NotImplementedError

    def spending(self) -> dict[str, Any]:
        """What the rewriter has spent so far against its budget caps (:data:`curate.lm.calls.CHARGED`
        keys: calls, new_tokens, prompt_tokens, cost) and its failed calls (``failed``, ``first_error``);
        an LLM-free rewriter spends nothing."""
        return {}

    def carry(self, charged: dict[str, Any]) -> None:
        """Count what an earlier run spent on a unit that is not run again (its stored ``charged``), so
        the budget caps hold over the whole step across runs. Nothing to do without a model."""

    def plan_calls(self, n_records: int) -> int | None:
        """Most model calls a run over ``n_records`` rows can make (``curate plan``); None: no model."""
        return None
