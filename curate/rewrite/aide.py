"""AIDE (methods.md C4): expand a few seed rows of a task into many, by attribute-guided multi-hop rewriting.

Per seed a tree is grown **breadth first**. The seed is layer 1; a node of layer L gets children of
layer L+1:

- **analysis** — one call names the node's topic and related knowledge (``<Topic>``,
  ``<Related knowledge>a, b, c</Related knowledge>``; the last match of a tag wins, the lowercase
  tag is the fallback; items are stripped, de-duplicated and capped at ``max_attributes``); with
  ``ex_kg`` a second call adds up to ``num_triples`` concepts from new ``[topic, relation, concept]``
  triples (the last quoted item of each bracketed line);
- **relevance hops** (L ≤ ``r_depth``): per attribute and per direction (``reasoning`` — more steps
  of reasoning, ``concrete`` — specific details, ``constraint`` — added requirements) one rewrite of
  the *node's* text into ``<Rewritten Prompt>``; past layer ``sk_conn`` the prompt also asks to stay
  close to the seed (the residual connection: every direction; ``match_reference: true`` — reasoning
  only, as the reference code behaves);
- **diversity hops** (L ≤ ``d_depth``): per chosen persona one ``<Created Prompt>`` in that
  persona's voice, related to the node's topic but different from its text; without a persona file,
  one created prompt per node. Personas come from a local file (one per line); the ``persona_k``
  most similar to ``use_case`` (cosine with the flow's embedder, above ``persona_threshold``; equal
  similarities: the lower line first) are used — none passing: no diversity hops. Their similarities are cached under
  ``<store>/aide/personas/`` by (use case hash, persona file hash, embedder key).

**Binary tasks** (``choice_type: binary``), as the reference's ``call_relevance_synthesis`` /
``call_diversity_synthesis``: the rewritten or created prompt is a Yes/No question, and the teacher's
reply also holds, in ``<Response>``, a reply of more than two words to that question — one that answers
it by implication, or one about something unrelated (the length is asked, not checked). That reply is
part of the training instruction, laid out by ``binary_layout``: ``append`` — the question, a newline,
the reply (the reference concatenates them with nothing between); ``speakers`` — ``Speaker 1:
'<question>' Speaker 2: '<reply>'`` (the reference's implicature layout). A reply without a
``<Response>`` (last match, lowercase fallback) or with an empty one rejects the child
(``response_parse_failed``; the reference would go on with an empty reply, or for a created prompt with
the teacher's whole reply). The Yes/No label always comes from the separate answer call on the joined
instruction. The next hop rewrites the joined text (``append``) or the Speaker 1 question (``speakers``,
where the text still has that layout), as the reference does.

Each child then gets an **answer** (``choice_type``: ``multi_choice`` — one ``Correct:`` and three
``Incorrect:`` options in ``<Choices>``; ``binary`` — Yes or No in ``<Choices>``: whether the
question is answered Yes (``append``) or whether Speaker 2's reply answers Speaker 1 (``speakers``);
``free_form`` — the answer in ``<Choices>``). Once a shortening or improve call changes a child's
text its answer is redone. The generation record names the call that gave the answer
(``answer_call``).

With ``reflection``, each child then goes through **self-reflection**: if the instruction is longer
than ``len_token`` tokens (teacher tokenizer) one improve call shortens it; a grader scores it 1–10
(relevance to the seed for relevance hops, difference from the parent for diversity hops) and it is
accepted when the score is > 4, else an improve call gets the feedback and the answer is redone, up
to ``max_reflection_relevance`` / ``max_reflection_diversity`` grades; after acceptance an
answer-in-choices check (not for ``binary``) redoes the answer until the check says Yes, up to
``max_choice_checks_relevance`` / ``_diversity`` checks. A child that is never accepted, or whose
check never passes, is **rejected** (the reference keeps it). The check prompt asks the teacher to
work the answer out first, so a check call gets the whole ``decoding.max_tokens`` (the reference sets
no smaller limit for it); ``judge_max_tokens`` caps only the grade calls.

**Decoding.** The teacher samples by default as the reference's OpenAI path sets it (temperature 1,
top_p 0.95, max_tokens 2048; its default Claude path sets none, and Claude's default temperature is 1);
a flow's ``decoding`` keys replace only the keys it names. Each sampled call has its own seed, from the
run seed and the call's place in the tree (:meth:`AIDEStep.ask_one`), so a redone answer or grade is a
new draw and a new cache entry; with greedy decoding (``temperature: 0``) the same prompt would get the
same reply, so a failed check is final and the grading stops once an improve call leaves the text as it
was. A reply that stops at the token limit (status ``truncated``) is never parsed: its node or child
fails with reason ``truncated`` (a truncated KG-expansion reply only adds no attributes).

**Post-processing**, per level, before a child may expand: length filter (instruction tokens ≤
``len_token``), multiple-choice sanitising (exactly one correct option, at least
``num_target_scores − 1`` distractors; that many are drawn with a seeded RNG and the options are
shuffled), then near-duplicate removal — the instruction is embedded with the step's ``embed``
(default: the flow's embedder, else MiniLM) and greedily, in tree order, a child whose cosine similarity to a seed
or to an earlier kept child is > ``dedup_threshold`` is dropped, so near-duplicate branches are
pruned before they grow.

**Bounds.** Children are issued level by level (breadth first). Under ``max_nodes_per_seed`` (children
per seed, all levels) a level's children are dealt out fairly (:func:`allocate`): one per node in turn,
over all of the seed's nodes of that level, so every node gets its share (the counts differ by at most
one; a node gets fewer only when it has no more) before any node gets more, and a level is served before
the next; the children left out are counted as ``node_cap``. Every call goes through the call engine,
whose budget caps (``max_calls``, ``max_new_tokens_total``, ``max_cost``) are checked before each call;
a refused call rejects its child (``budget_exhausted``). :meth:`AIDEStep.plan_calls` is the arithmetic
upper bound of calls. Each round of the children's work (all nodes of all seeds at one level) is one
``ask()`` — one batch for the engine (:meth:`~curate.rewrite.llm.LLMRewriter.drive` runs each node's
analysis and each child's calls as a generator task).

**Code.** Each kind of call is one unit in :mod:`curate.rewrite.aide_units` (its prompt with its
reply's parse, distilabel style); :meth:`AIDEStep.grow` is a child's sequence of units, the tag
parsers are in :mod:`curate.rewrite.tags`.

Every accepted child is a derived row ``[user, assistant]`` with origin
``aide:relevance:<direction>`` or ``aide:diversity``, parents ``[seed sample_id]`` and a generation
record naming its parent node, layer, topic, skill or persona, grades and every call. Statuses and
rejections are counted by reason in the step's stats; each seed row is ``used`` (≥ 1 row),
``passthrough`` with reason ``not_single_turn`` (only ``[user, assistant]`` rows without tools are
seeds), ``passthrough`` with reason ``analysis_failed`` (its analysis gave no topic; the status as
detail) or ``no_accepted_children`` (the seed's rejection counts as detail).
The whole input is one unit of work; a killed run repeats no finished call (the call cache).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from curate import prompts as P
from curate.config import EmbedSpec
from curate.lm.calls import Call, Decoding, Reply
from curate.records import canonical_json, sample_id, sha256_hex
from curate.rewrite.aide_units import (
    ANSWER,
    CHECK,
    DIVERSITY_HOP,
    GRADE_DIVERSITY,
    GRADE_RELEVANCE,
    IMPROVE,
    KG_EXPAND,
    RELEVANCE_HOP,
    TOPIC,
    CallUnit,
    speaker_1,
)
from curate.rewrite.base import UnitResult
from curate.rewrite.llm import LLMParams, LLMRewriter

Direction = Literal["reasoning", "concrete", "constraint"]
DIRECTIONS: tuple[str, ...] = ("reasoning", "concrete", "constraint")
#: use-case keywords that pick a few-shot example set (first match wins; else "general")
EXAMPLE_DOMAINS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("code", ("code", "program", "python", "software", "implementation", "function")),
    ("math", ("math", "arithmetic", "algebra", "geometry", "calculation")),
)
OPTION_LETTERS = "ABCDEFGHIJ"


# -- personas and near-duplicates -----------------------------------------------------------------

def choose_personas(similarities: np.ndarray, k: int, threshold: float) -> list[int]:
    """Indices of the ``k`` most similar personas with similarity > ``threshold``; equal
    similarities: lower index first."""
    idx = [i for i in range(len(similarities)) if similarities[i] > threshold]
    idx.sort(key=lambda i: (-float(similarities[i]), i))
    return idx[:k]


def greedy_dedup(X: np.ndarray, n_fixed: int, threshold: float) -> tuple[list[int], dict[int, tuple[int, float]]]:
    """Rows ``n_fixed..`` of the L2-normalised ``X`` in order: a row whose cosine similarity to any
    fixed row or earlier kept row is > ``threshold`` is dropped. Returns (kept row indices, dropped
    row → (blocking row, similarity))."""
    kept = list(range(n_fixed))
    dropped: dict[int, tuple[int, float]] = {}
    out = []
    for i in range(n_fixed, len(X)):
        if kept:
            sims = X[kept] @ X[i]
            j = int(np.argmax(sims))
            if float(sims[j]) > threshold:
                dropped[i] = (kept[j], float(sims[j]))
                continue
        kept.append(i)
        out.append(i)
    return out, dropped


# -- parameters -----------------------------------------------------------------------------------

#: the reference's sampling (its OpenAI path: temperature 1, top_p 0.95, max_tokens 2048)
AIDE_DECODING: dict[str, Any] = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 2048}


class AIDEParams(LLMParams):
    decoding: Decoding = Field(default_factory=lambda: Decoding(**AIDE_DECODING),
                               description="How the teacher generates; default sampled as the reference (temperature 1, top_p 0.95, "
                               "max_tokens 2048); the keys given replace only those.")
    use_case: str = Field(min_length=1, description="The target task in words, e.g. 'Python code generation'; it enters every prompt.")
    choice_type: Literal["multi_choice", "binary", "free_form"] = Field(
        "multi_choice", description="Answer form: four options with one correct, Yes/No, or a free answer.")
    binary_layout: Literal["append", "speakers"] = Field(
        "append", description="Binary tasks: how a question and the reply written to it form the instruction: the reply on the "
        "next line, or Speaker 1: '…' Speaker 2: '…' (implicature).")
    directions: tuple[Direction, ...] = Field(DIRECTIONS, min_length=1, description="Relevance-hop directions.")
    r_depth: int = Field(2, ge=0, description="Relevance hops expand nodes of layer ≤ r_depth (the seed is layer 1).")
    d_depth: int = Field(2, ge=0, description="Diversity hops expand nodes of layer ≤ d_depth.")
    sk_conn: int = Field(1, ge=0, description="Residual connection (stay close to the seed) when the rewritten node's layer > sk_conn.")
    max_attributes: int = Field(3, ge=0, description="Attributes kept from the analysis (the prompt asks for 3).")
    ex_kg: bool = Field(True, description="Knowledge-graph expansion adds up to num_triples attributes per node.")
    num_triples: int = Field(2, ge=0)
    personas: str | None = Field(None, description="Persona file (one per line, '#' comments), relative to the flow's "
                                 "base_dir; none: one plain created prompt per node.")
    persona_k: int = Field(5, ge=0, description="Personas used: the most similar to use_case.")
    persona_threshold: float = Field(0.3, description="Cosine similarity a persona must exceed (the reference's 0.75 was "
                                     "for jina-v2; MiniLM scores lower).")
    reflection: bool = Field(True, description="Length check, graded acceptance and answer-in-choices check.")
    max_reflection_relevance: int = Field(5, ge=1, description="Most grades of a relevance child.")
    max_reflection_diversity: int = Field(20, ge=1, description="Most grades of a diversity child.")
    max_choice_checks_relevance: int = Field(5, ge=1)
    max_choice_checks_diversity: int = Field(20, ge=1)
    len_token: int = Field(500, gt=0, description="Instruction length in teacher tokens: longer → one shortening call; "
                           "still longer → rejected.")
    max_nodes_per_seed: int | None = Field(50, ge=0, description="Most children issued per seed (all layers); none: no cap.")
    dedup_threshold: float = Field(0.95, description="Cosine similarity above which a child is a near duplicate.")
    num_target_scores: int = Field(4, ge=2, description="Options per multiple-choice row (one correct).")
    judge_max_tokens: int | None = Field(None, gt=0, description="max_tokens of grade calls (none: the decoding's); check "
                                         "calls always get the decoding's, to work the answer out first.")
    embed: EmbedSpec | None = Field(None, description="Embedder for personas and dedup; default: the flow's (passed by the "
                                    "pipeline), else MiniLM.")
    match_reference: bool = Field(False, description="Residual connection on the reasoning direction only.")

    @field_validator("decoding", mode="before")
    @classmethod
    def _decoding_defaults(cls, value: Any) -> Any:
        """A partial ``decoding`` mapping keeps AIDE's defaults for the keys it leaves out."""
        return {**AIDE_DECODING, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> AIDEParams:
        if len(set(self.directions)) != len(self.directions):
            raise ValueError("directions repeat")
        return self


# -- tree -----------------------------------------------------------------------------------------

@dataclass
class Node:
    seed: int  # index into the unit's seeds
    path: str  # "0" for the seed, "0.3.1" for a child: child slots from the seed down
    layer: int
    text: str
    variant: str = "seed"  # seed | relevance:<direction> | diversity
    parent: Node | None = None
    sample_id: str | None = None  # seeds: their sample_id; children: that of their derived row
    seed_sid: str = ""  # the seed row's sample_id
    topic: str | None = None
    status: str | None = None  # the analysis status
    attributes: list[str] = field(default_factory=list)
    analysis: list[tuple[str, Call, Reply]] = field(default_factory=list)


@dataclass
class ChildSpec:
    parent: Node
    slot: int
    kind: str  # relevance | diversity
    direction: str | None = None
    skill: str | None = None
    persona: str | None = None


@dataclass
class Child:
    spec: ChildSpec
    text: str | None = None
    answer: Any = None  # multi: [(option, 1|0)]; binary: "Yes"/"No"; free: str
    answer_raw: str | None = None
    answer_call: str | None = None  # the name of the call whose reply gave the answer ("answer", "improve_1_answer", …)
    grades: list[int | None] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    exchanges: list[tuple[str, Call, Reply]] = field(default_factory=list)
    reject: str | None = None
    detail: str | None = None

    def where(self, name: str) -> str:
        """The place of this child's call ``name`` in the tree (its seed and cache identity)."""
        parent = self.spec.parent
        return f"{parent.seed_sid}/{parent.path}.{self.spec.slot}/{name}"


def failed_call(reply: Reply) -> str:
    """The reason a call whose reply is not ``ok`` gives its node or child: ``budget_exhausted``,
    ``truncated`` (the reply hit the token limit; its text is never parsed) or ``call_failed``."""
    return reply.status if reply.status in ("budget_exhausted", "truncated") else "call_failed"


def candidates(node: Node, want_rel: bool, want_div: bool, directions: tuple[str, ...], personas: list[str]) -> list[ChildSpec]:
    """Every child a node can have, each with its fixed slot (its place in the node's path): the
    relevance children (attribute × direction) then the diversity children (one per persona, or one
    without personas)."""
    kinds: list[ChildSpec] = []
    if want_rel:
        kinds += [ChildSpec(node, 0, "relevance", direction=d, skill=a) for a in node.attributes for d in directions]
    if want_div:
        kinds += [ChildSpec(node, 0, "diversity", persona=x) for x in (personas or [None])]
    for slot, spec in enumerate(kinds):
        spec.slot = slot
    return kinds


def deal_order(kinds: list[ChildSpec], n_dir: int, turn: int) -> list[ChildSpec]:
    """The order in which a node's children are handed out under a cap: groups (one per attribute,
    its directions rotated by the attribute's index; then the diversity children) taken one child
    each in turn, starting at group ``turn`` (mod the number of groups) — so a node's first children
    differ in attribute and direction, and nodes of a level start at different groups."""
    rel = [k for k in kinds if k.kind == "relevance"]
    groups = [rel[i:i + n_dir] for i in range(0, len(rel), n_dir)]
    groups = [g[j % len(g):] + g[:j % len(g)] for j, g in enumerate(groups)]
    div = [k for k in kinds if k.kind == "diversity"]
    if div:
        groups.append(div)
    if not groups:
        return []
    t = turn % len(groups)
    groups = groups[t:] + groups[:t]
    return [g[r] for r in range(max(map(len, groups))) for g in groups if r < len(g)]


def allocate(frontier: list[Node], want_rel: bool, want_div: bool, directions: tuple[str, ...], personas: list[str],
             cap: int | None, issued: Counter) -> tuple[list[ChildSpec], Counter]:
    """The children of one level, breadth first and fair under the cap. Each analysed node (topic
    known) has its :func:`candidates`. Without a cap all are issued. With one, a seed may issue
    ``cap − issued[seed]`` more; they are dealt round-robin over the seed's nodes of this level in
    tree order, one child per node per round (each node's next child by :func:`deal_order`, its
    ``turn`` the node's index among them), so the counts per node differ by at most one, earlier
    nodes taking the extra ones. ``issued`` is updated. Returns the specs in tree order (node, then
    slot) and the children refused by the cap, per seed."""
    per_seed: dict[int, list[list[ChildSpec]]] = {}
    position: dict[int, int] = {}
    for i, node in enumerate(frontier):
        if node.topic is None:
            continue
        position[id(node)] = i
        own = per_seed.setdefault(node.seed, [])
        own.append(deal_order(candidates(node, want_rel, want_div, directions, personas), len(directions), len(own)))
    specs: list[ChildSpec] = []
    capped: Counter = Counter()
    for seed, orders in per_seed.items():
        left = None if cap is None else max(cap - issued[seed], 0)
        taken = 0
        for r in range(max(map(len, orders), default=0)):
            for order in orders:
                if r < len(order) and (left is None or taken < left):
                    specs.append(order[r])
                    taken += 1
        issued[seed] += taken
        if (refused := sum(map(len, orders)) - taken) > 0:
            capped[seed] += refused
    specs.sort(key=lambda x: (position[id(x.parent)], x.slot))
    return specs, capped


class AIDEStep(LLMRewriter):
    """The ``aide`` rewrite step (see the module docstring)."""

    method = "aide"
    # 1.1: seeds whose analysis fails are passed through as analysis_failed; 1.2: each sampled call has its own seed
    # (a redone answer or grade is a new draw, not the cached reply), and greedy decoding does not repeat a prompt;
    # 1.3: a binary relevance rewrite also writes <Response>, the child's answer (no answer call; missing: rejected)
    # 1.4: children dealt fairly under the node cap; binary <Response> is a reply inside the instruction, labelled by the
    # answer call; sampled decoding by default; check calls get the whole max_tokens; a truncated reply fails its call
    version = "1.4"
    Params = AIDEParams
    prompts: ClassVar[tuple[P.Prompt, ...]] = P.AIDE_PROMPTS

    def __init__(self, name, params=None, context=None):
        super().__init__(name, params, context)
        self._embedder = None
        self._tok = None
        self._persona_file: tuple[bytes, str] | None = None

    # -- identity and bounds ----------------------------------------------------------------------
    @property
    def embed_spec(self) -> EmbedSpec:
        p: AIDEParams = self.params
        return p.embed or self.context.extra.get("embed") or EmbedSpec()

    @property
    def embedder(self):
        if self._embedder is None:
            from curate.embed import build_embedder

            self._embedder = build_embedder(self.embed_spec, self.context.torch_threads)
        return self._embedder

    def persona_path(self) -> Path | None:
        p: AIDEParams = self.params
        if p.personas is None:
            return None
        path = Path(p.personas)
        return path if path.is_absolute() else Path(self.context.base_dir or ".") / path

    def persona_file(self) -> tuple[bytes, str] | None:
        """The persona file's bytes and their sha256, read once per step (the fingerprint and the
        persona choice see the same file); None without ``personas``."""
        if self._persona_file is None and (path := self.persona_path()) is not None:
            raw = path.read_bytes()
            self._persona_file = (raw, sha256_hex(raw))
        return self._persona_file

    def fingerprint(self) -> dict[str, Any]:
        pf = self.persona_file()
        return {**super().fingerprint(), "embedder": self.embedder.fingerprint(), "persona_file_sha256": pf[1] if pf else None}

    def child_costs(self) -> tuple[int, int]:
        """Most calls one relevance child and one diversity child can make."""
        p: AIDEParams = self.params

        def cost(rounds: int, checks: int) -> int:
            c = 2  # rewrite + answer
            if not p.reflection:
                return c
            c += 2 + rounds + 2 * (rounds - 1)  # shorten + answer, grades, improve + answer between grades
            if p.choice_type != "binary":
                c += checks + (checks - 1)  # checks, answer redone between checks
            return c

        return (cost(p.max_reflection_relevance, p.max_choice_checks_relevance),
                cost(p.max_reflection_diversity, p.max_choice_checks_diversity))

    def tree_bound(self) -> dict[str, int]:
        """Largest tree of one seed: children per layer with every node having the most attributes
        (max_attributes + num_triples) and personas (persona_k, or 1 without a file), then the caps."""
        p: AIDEParams = self.params
        f_rel = (p.max_attributes + (p.num_triples if p.ex_kg else 0)) * len(p.directions)
        f_div = (p.persona_k if p.personas else 1)
        depth = max(p.r_depth, p.d_depth)
        n, rel, div, expand, kg = 1, 0, 0, 0, 0
        for layer in range(1, depth + 1):
            r = n * f_rel if layer <= p.r_depth else 0
            d = n * f_div if layer <= p.d_depth else 0
            if r + d:
                expand += n
                kg += n if (p.ex_kg and r) else 0
            rel, div, n = rel + r, div + d, r + d
        M = p.max_nodes_per_seed
        if M is not None:
            # the seed and at most M children are analysed
            expand, kg = min(expand, 1 + M), min(kg, 1 + M)
        c_rel, c_div = self.child_costs()
        cap = M if M is not None else rel + div
        if c_div >= c_rel:
            n_div = min(cap, div)
            n_rel = min(cap - n_div, rel)
        else:
            n_rel = min(cap, rel)
            n_div = min(cap - n_rel, div)
        calls = expand + kg + n_rel * c_rel + n_div * c_div
        return {"relevance_children": rel, "diversity_children": div, "children": min(cap, rel + div), "analysed": expand,
                "kg_calls": kg, "calls": calls}

    def plan_calls(self, n_records: int) -> int:
        """Most model calls for ``n_records`` seeds: :meth:`tree_bound` per seed, at most ``budget.max_calls``."""
        total = n_records * self.tree_bound()["calls"]
        cap = self.params.budget.max_calls
        return total if cap is None else min(total, cap)

    # -- helpers ----------------------------------------------------------------------------------
    def n_tokens(self, text: str) -> int:
        """Teacher tokens of ``text``, no special tokens."""
        if self._tok is None:
            from curate.rewrite.tokens import TokenCounter

            self._tok = TokenCounter(self.engine.backend.tokenizer, "raw")
        return self._tok.count(text)

    def examples(self, kind: str) -> str:
        p: AIDEParams = self.params
        if p.choice_type == "binary":
            domain = "yesno"
        else:
            uc = p.use_case.lower()
            domain = next((d for d, words in EXAMPLE_DOMAINS if any(w in uc for w in words)), "general")
        return P.AIDE_EXAMPLES[(domain, kind)].text

    def next_text(self, text: str) -> str:
        """The text a child's own children start from: its instruction, or for a binary ``speakers``
        instruction still in that layout Speaker 1's question (as the reference's next hop)."""
        p: AIDEParams = self.params
        if p.choice_type == "binary" and p.binary_layout == "speakers":
            return speaker_1(text) or text
        return text

    @property
    def sampled(self) -> bool:
        """Whether the teacher samples: only then can asking the same prompt again give another reply."""
        return self.params.decoding.temperature > 0

    def ask_one(self, prompt: P.Prompt, where: str, judge: bool = False, shape: dict | None = None, **fields) -> Call:
        """A call of ``prompt`` filled with ``fields``. ``where`` names the call's place in the tree
        (``<seed sample_id>/<node path>/<call name>``): a sampled call's seed derives from it and the run
        seed (methods.md E2), so each call of a tree, a redone answer or grade included, has its own
        seed and cache entry. ``shape``: the reply's output shape when it is not the prompt's own
        (used with ``decoding.constrain``)."""
        d = self.params.decoding
        if judge and self.params.judge_max_tokens is not None:
            d = d.model_copy(update={"max_tokens": min(d.max_tokens, self.params.judge_max_tokens)})
        seed = int(sha256_hex(str(self.context.seed), self.method, where)[:15], 16)
        return self.call(prompt, [{"role": "user", "content": prompt.text.format(**fields)}], seed=seed, decoding=d, shape=shape)

    # -- per-node work (generators run by :meth:`drive`; one call kind per unit: :mod:`curate.rewrite.aide_units`) ---
    def run_call(self, log: list[tuple[str, Call, Reply]], unit: CallUnit, target: Node | Child, name: str, *args: Any) -> Generator:
        """One call of ``unit`` for ``target`` named ``name`` (a round of its own), logged with its reply
        in ``log`` (a node's ``analysis``, a child's ``exchanges``). Returns (:func:`failed_call`'s
        reason, None) for a reply that is not ``ok`` (never parsed), else (None, what the unit's
        ``format_output`` gives)."""
        c = unit.format_input(self, target, name, *args)
        (r,) = yield [c]
        log.append((name, c, r))
        if r.status != "ok":
            return failed_call(r), None
        return None, unit.format_output(self, target, name, r)

    def analyse(self, node: Node, want_rel: bool) -> Generator:
        """A node's analysis: its topic and attributes, then (relevance hops, ``ex_kg``) the
        knowledge-graph expansion, whose failure only adds no attributes. Returns the analysis status."""
        p: AIDEParams = self.params
        why, status = yield from self.run_call(node.analysis, TOPIC, node, "topic")
        if why:
            node.status = why
            return why
        if node.topic is not None and want_rel and p.ex_kg and node.attributes and p.num_triples:
            yield from self.run_call(node.analysis, KG_EXPAND, node, "kg")
        return status

    def grow(self, spec: ChildSpec, seed_text: str) -> Generator:
        """One child, as the sequence of its calls: the hop (a rewrite of the node's text, or a created
        prompt; binary: the question and a reply to it, joined by ``binary_layout``), the answer, then
        with ``reflection`` the self-reflection (:meth:`reflect`). Returns the :class:`Child`, with the
        reason it is rejected if it is."""
        child = Child(spec)
        relevance = spec.kind == "relevance"
        why, bad = yield from self.run_call(child.exchanges, RELEVANCE_HOP if relevance else DIVERSITY_HOP, child, "rewrite", seed_text)
        why = why or bad
        if why is None:
            why = yield from self.answer(child, "answer")
        if why is None and self.params.reflection:
            why = yield from self.reflect(child, seed_text if relevance else spec.parent.text)
        child.reject = why
        return child

    def answer(self, child: Child, name: str) -> Generator:
        """The answer call ``name`` (:data:`~curate.rewrite.aide_units.ANSWER`); returns a failure reason or None."""
        why, bad = yield from self.run_call(child.exchanges, ANSWER, child, name)
        return why or bad

    def improve(self, child: Child, original: str, feedback: P.Prompt, name: str) -> Generator:
        """One improve call; on a parsed reply that differs the text changes and the answer is redone.
        Returns (failure reason or None, whether the text changed)."""
        why, text = yield from self.run_call(child.exchanges, IMPROVE, child, name, original, feedback)
        if why:
            return why, False
        if text is None or text == child.text:
            return None, False  # nothing changed: the old text and answer stand
        child.text = text
        return (yield from self.answer(child, f"{name}_answer")), True

    def reflect(self, child: Child, original: str) -> Generator:
        """Self-reflection of an answered child against ``original`` (the seed for a relevance hop, the
        parent's text for a diversity hop): one shortening improve call when it is longer than
        ``len_token`` tokens, the graded acceptance (:meth:`grades`), then (not binary) the
        answer-in-choices check (:meth:`choice_checks`). Returns why the child is rejected, or None."""
        p: AIDEParams = self.params
        if self.n_tokens(child.text) > p.len_token:
            why, _ = yield from self.improve(child, original, P.AIDE_FEEDBACK_TOO_LONG, "shorten")
            if why:
                return why
        why = yield from self.grades(child, original)
        if why or p.choice_type == "binary":
            return why
        return (yield from self.choice_checks(child))

    def grades(self, child: Child, original: str) -> Generator:
        """Grades until one accepts, up to ``max_reflection_relevance`` / ``_diversity``, an improve call
        with the grader's feedback between two. Returns None (accepted) or why not (the grades as detail)."""
        p: AIDEParams = self.params
        relevance = child.spec.kind == "relevance"
        grade = GRADE_RELEVANCE if relevance else GRADE_DIVERSITY
        rounds = p.max_reflection_relevance if relevance else p.max_reflection_diversity
        for k in range(1, rounds + 1):
            why, accepted = yield from self.run_call(child.exchanges, grade, child, f"grade_{k}", original)
            if why:
                return why
            if accepted:
                return None
            if k < rounds:
                why, changed = yield from self.improve(child, original, grade.feedback, f"improve_{k}")
                if why:
                    return why
                if not changed and not self.sampled:
                    break  # greedy: the same text would get the same grade and the same improve reply again
        child.detail = f"grades {child.grades}"
        return "reflection_rejected" if any(g is not None for g in child.grades) else "grade_parse_failed"

    def choice_checks(self, child: Child) -> Generator:
        """Answer-in-choices checks until one says Yes, up to ``max_choice_checks_relevance`` /
        ``_diversity``, the answer redone between two (sampled decoding only). Returns None or why not."""
        p: AIDEParams = self.params
        checks = p.max_choice_checks_relevance if child.spec.kind == "relevance" else p.max_choice_checks_diversity
        for k in range(1, checks + 1):
            why, ok = yield from self.run_call(child.exchanges, CHECK, child, f"check_{k}")
            if why:
                return why
            if ok:
                return None
            if not self.sampled:
                break  # greedy: the answer redone from the same prompt would be the same answer, and so the check
            if k < checks:
                why = yield from self.answer(child, f"check_{k}_answer")
                if why:
                    return why
        return "answer_not_in_choices"

    # -- personas ---------------------------------------------------------------------------------
    def persona_similarities(self) -> tuple[list[str], np.ndarray]:
        """The persona file's lines and their cosine similarity to ``use_case`` (cached in the store)."""
        import json

        from curate.store import persona_cache

        raw, file_sha = self.persona_file()
        personas = [ln.strip() for ln in raw.decode("utf-8").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        key = sha256_hex(sha256_hex(self.params.use_case), file_sha, self.embedder.key)
        cache = persona_cache(self.context.store_dir, key) if self.context.store_dir else None
        if cache is not None and cache.exists():
            sims = np.asarray(json.loads(cache.read_text(encoding="utf-8"))["similarities"], dtype=np.float64)
            if len(sims) == len(personas):
                return personas, sims
        X = self.embedder.embed(personas + [self.params.use_case]).astype(np.float64)
        X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        sims = X[:-1] @ X[-1]
        if cache is not None:
            from curate.io import write_json

            write_json(cache, {"use_case": self.params.use_case, "persona_file_sha256": file_sha, "embedder_key": self.embedder.key,
                               "similarities": [float(s) for s in sims]})
        return personas, sims

    # -- the run ----------------------------------------------------------------------------------
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        X = self.embedder.embed(texts).astype(np.float32)
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def run_unit(self, unit: str, records: list[dict[str, Any]]) -> UnitResult:
        p: AIDEParams = self.params
        out = UnitResult()
        seeds: list[Node] = []
        for r in records:
            msgs = r["messages"]
            if [m["role"] for m in msgs] != ["user", "assistant"] or r.get("tools") or any(m.get("tool_calls") for m in msgs) \
                    or not msgs[0]["content"].strip():
                out.dispositions[r["sample_id"]] = ("passthrough", "not_single_turn", "AIDE seeds are [user, assistant] rows without tools")
                continue
            seeds.append(Node(len(seeds), "0", 1, msgs[0]["content"], sample_id=r["sample_id"], seed_sid=r["sample_id"]))
        personas: list[str] = []
        persona_sims: list[float] = []
        if p.personas and p.d_depth >= 1 and seeds:
            names, sims = self.persona_similarities()
            chosen = choose_personas(sims, p.persona_k, p.persona_threshold)
            personas, persona_sims = [names[i] for i in chosen], [float(sims[i]) for i in chosen]
        seed_rejects: dict[int, Counter] = {s.seed: Counter() for s in seeds}  # rejections by reason, per seed
        statuses: Counter = Counter()
        analysis_status: Counter = Counter()
        calls_per_seed: Counter = Counter()
        issued: Counter = Counter()  # children issued per seed
        accepted_per_seed: Counter = Counter()
        levels: list[dict[str, Any]] = []
        seed_texts = [s.text for s in seeds]
        kept_X = self.embed_texts(seed_texts) if seeds else None
        frontier = list(seeds)
        layer = 1
        while frontier and layer <= max(p.r_depth, p.d_depth):
            want_rel = layer <= p.r_depth and p.max_attributes > 0
            want_div = layer <= p.d_depth and (not p.personas or bool(personas))
            if not (want_rel or want_div):
                break
            results = self.drive([self.analyse(n, want_rel) for n in frontier], [n.seed for n in frontier], calls_per_seed)
            analysis_status.update(results)
            specs, capped_by_seed = allocate(frontier, want_rel, want_div, p.directions, personas, p.max_nodes_per_seed, issued)
            capped = sum(capped_by_seed.values())
            for seed, n in capped_by_seed.items():
                seed_rejects[seed]["node_cap"] += n
            children: list[Child] = self.drive([self.grow(s, seed_texts[s.parent.seed]) for s in specs], [s.parent.seed for s in specs],
                                               calls_per_seed)
            for ch in children:
                statuses.update(ch.statuses)
            # post-processing: length, multiple-choice sanitising, then near-duplicates (tree order)
            survivors: list[tuple[Child, list[dict[str, Any]], dict[str, Any]]] = []
            for ch in children:
                if ch.reject is None and (n_tok := self.n_tokens(ch.text)) > p.len_token:
                    ch.reject, ch.detail = "too_long", f"{n_tok} tokens > len_token {p.len_token}"
                if ch.reject is None:
                    built = self.render(ch)
                    if isinstance(built, str):
                        ch.reject = built
                    else:
                        survivors.append((ch, *built))
            X = self.embed_texts([ch.text for ch, _, _ in survivors])
            allX = np.vstack([kept_X, X]) if len(survivors) else kept_X
            n_fixed = len(kept_X)
            keep, dropped = greedy_dedup(allX, n_fixed, p.dedup_threshold)
            next_frontier: list[Node] = []
            for i, dup in dropped.items():
                ch = survivors[i - n_fixed][0]
                ch.reject, ch.detail = "near_duplicate", f"cosine {dup[1]:.4f} > {p.dedup_threshold}"
            for i in keep:
                ch, messages, original = survivors[i - n_fixed]
                spec = ch.spec
                node = Node(spec.parent.seed, f"{spec.parent.path}.{spec.slot}", layer + 1, self.next_text(ch.text),
                            f"relevance:{spec.direction}" if spec.kind == "relevance" else "diversity", spec.parent,
                            sample_id=sample_id(messages), seed_sid=spec.parent.seed_sid)
                gen = self.generation(spec.parent.analysis + ch.exchanges, node=node.path, layer=node.layer,
                                      seed_sample_id=seeds[node.seed].sample_id, parent_node=spec.parent.path,
                                      parent_sample_id=spec.parent.sample_id, topic=spec.parent.topic, skill=spec.skill,
                                      persona=spec.persona, grades=ch.grades, statuses=ch.statuses, use_case=p.use_case,
                                      choice_type=p.choice_type, answer_call=ch.answer_call)
                out.derive(messages, parents=[seeds[node.seed].sample_id], variant=node.variant, generation=gen, original=original)
                accepted_per_seed[node.seed] += 1
                next_frontier.append(node)
            if keep:
                kept_X = np.vstack([kept_X, allX[keep]])
            level_rejects = Counter(ch.reject for ch in children if ch.reject)
            for ch in children:
                if ch.reject:
                    seed_rejects[ch.spec.parent.seed][ch.reject] += 1
            levels.append({"layer": layer, "expanded": len(frontier), "issued": len(specs), "node_cap": capped,
                           "accepted": len(next_frontier), "rejected": dict(sorted(level_rejects.items()))})
            frontier = next_frontier
            layer += 1
        for s in seeds:
            if accepted_per_seed[s.seed]:
                continue
            if s.topic is None and s.status is not None:
                out.dispositions[s.sample_id] = ("passthrough", "analysis_failed", f"seed analysis: {s.status}")
            else:
                detail = f"children rejected: {canonical_json(dict(sorted(seed_rejects[s.seed].items())))}"
                out.dispositions[s.sample_id] = ("passthrough", "no_accepted_children", detail)
        rejected = sum(seed_rejects.values(), Counter())
        out.stats = {
            "seeds": len(seeds), "not_single_turn": len(records) - len(seeds), "derived": len(out.derived),
            "issued": sum(issued.values()), "accepted": len(out.derived), "rejected": dict(sorted(rejected.items())),
            "analysis": dict(sorted(analysis_status.items())), "statuses": dict(sorted(statuses.items())), "levels": levels,
            "personas": [{"persona": x, "similarity": round(s, 6)} for x, s in zip(personas, persona_sims)],
            "max_calls_per_seed": max(calls_per_seed.values(), default=0), "max_children_per_seed": max(issued.values(), default=0),
            "bound": self.tree_bound(), "budget": self.budget_stats(),
        }
        return out

    def render(self, ch: Child) -> tuple[list[dict[str, Any]], dict[str, Any]] | str:
        """The derived row's messages and original record, or a rejection reason (multiple-choice
        sanitising: exactly one correct option, enough distractors)."""
        p: AIDEParams = self.params
        if p.choice_type != "multi_choice":
            return ([{"role": "user", "content": ch.text}, {"role": "assistant", "content": ch.answer}],
                    {"instruction": ch.text, "answer": ch.answer})
        correct = [o for o, v in ch.answer if v == 1]
        wrong: list[str] = []
        for o, v in ch.answer:
            if v == 0 and o not in wrong and o not in correct:
                wrong.append(o)
        if len(correct) != 1:
            ch.detail = f"{len(correct)} correct options"
            return "choices_invalid"
        if len(wrong) < p.num_target_scores - 1:
            ch.detail = f"{len(wrong)} distinct distractors < {p.num_target_scores - 1}"
            return "too_few_choices"
        spec = ch.spec
        key = sha256_hex("aide", str(self.context.seed), spec.parent.seed_sid, spec.parent.path, str(spec.slot), ch.text)
        rng = random.Random(int(key[:16], 16))
        options = [(correct[0], 1)] + [(w, 0) for w in rng.sample(wrong, p.num_target_scores - 1)]
        rng.shuffle(options)
        letter = next(OPTION_LETTERS[i] for i, (_, v) in enumerate(options) if v == 1)
        user = ch.text + "\n\n" + "\n".join(f"{OPTION_LETTERS[i]}. {o}" for i, (o, _) in enumerate(options))
        return ([{"role": "user", "content": user}, {"role": "assistant", "content": f"{letter}. {correct[0]}"}],
                {"instruction": ch.text, "target_scores": {o: v for o, v in options}})
