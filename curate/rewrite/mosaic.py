"""Mosaic-IT (methods.md C3): compose several single-turn rows into one multi-instruction row.

No model is involved. Per epoch the composable rows are shuffled (seeded), cut into chunks whose
target size is drawn from a chunk distribution, and each chunk grows one row at a time: for every
prefix of m rows a fresh set of indicators is drawn (strategy, numbering, delimiters, wording,
layout) and the prefix is rendered; the longest prefix whose render stays under the length cap is
emitted with ``count = m``. When even one row overflows, that row is counted as over-length for the
epoch and skipped. Strategies:

- **format** — numbered instructions, responses in the same order, optional response delimiters and
  a meta-instruction saying how responses are wrapped;
- **permute** — as format, but the responses come in another order, which an outer
  meta-instruction states (FIX, REVERSE, ALPHA, … see :func:`permute_order`);
- **maskout** — as format, but some instructions are to be ignored; their responses are left out and
  the others keep their order and their number tags (see :func:`maskout_positions`).

Input: canonical records (``curate.records``). Composable rows are exactly ``[user, assistant]``
without tool calls or tool schemas; rows with a system message and all other rows (multi-turn, tool
use) are passed through once, unchanged. Output (:class:`MosaicResult`): the derived rows (text,
``count``, ``parents`` in instruction order, strategy, method, every drawn choice, exact token
count), the passthrough list and the counts.

Speed (C3 "Performance"): every row's instruction and response are tokenized once per run; a
prefix's length is estimated as the sum of its pieces' token counts (row texts, and the literal
text between them — tags, delimiters, wording, chat template — tokenized once and cached); the
exact tokenization of the whole render runs only when the estimate is within ``JOIN_SLACK`` tokens
per junction of the cap, and always once on each accepted render. Decisions never wait for those
final counts, so they are made in one batched call per ``VERIFY_WINDOW`` chunks. If a final count is
over the cap (an estimate off by more than its slack), the epoch goes back to that chunk, recomputes
it from the same random state with an exact count for every prefix (as the reference does), and
continues from there. The output equals a loop that re-tokenizes every prefix whenever no estimate
is off by more than its slack; ``MosaicIT.run(records, every_prefix=True)`` is that loop.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.records import sha256_hex
from curate.rewrite import mosaic_text as T
from curate.rewrite.base import Rewriter, UnitResult
from curate.rewrite.tokens import TokenCounter, load_tokenizer

STRATEGIES: dict[str, tuple[str, ...]] = {
    "both": ("format", "permute", "maskout"),
    "format": ("format",),
    "order": ("format", "permute"),
    "mask": ("format", "maskout"),
}
PERMUTE_METHODS: tuple[str, ...] = tuple(T.PERMUTE_META)
MASKOUT_METHODS: tuple[str, ...] = tuple(T.MASKOUT_META)
ChunkMode = Literal["uniform", "fix_max", "max_length", "exp", "pareto", "lognormal", "logistic"]

#: Estimate slack: tokens allowed per junction between two separately counted pieces. A BPE merge
#: across a junction moves the count by one or two tokens; see docs/rewriting.md for measurements.
JOIN_SLACK = 2


class MosaicParams(BaseModel):
    """Mosaic-IT parameters. Fields left ``None`` take the value ``match_reference`` implies."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(4, ge=1, description="Passes over the data; each composes every row once.")
    chunk: ChunkMode = Field("uniform", description="Distribution of the target number of rows per mosaic.")
    max_count: int = Field(10, ge=1, description="Largest target number of rows per mosaic.")
    version: Literal["both", "format", "order", "mask"] = Field(
        "both", description="Strategies drawn: all three, format only, format|permute, format|maskout.")
    max_length: int = Field(2000, ge=1, description="Length cap in tokens.")
    count_with: Literal["template", "raw"] | None = Field(
        None, description="template: the target chat template + safety_margin (default); raw: instruction+response (reference).")
    tokenizer: str = Field("smollm2-135m-instruct", description="Target model whose tokenizer (and chat template) counts tokens.")
    safety_margin: int = Field(16, ge=0, description="Tokens kept free under max_length when counting with the template.")
    force_numbering: bool | None = Field(None,
                                         description="Always number the instructions when permute or maskout is drawn (default True).")
    alpha_sort: Literal["casefold", "case_sensitive"] | None = Field(
        None, description="ALPHA / REVERSE_ALPHA sort key: case-folded text (default) or Python's string order (reference).")
    passthrough_overlong: bool = Field(False, description="Emit rows that fit in no mosaic of any epoch unchanged.")
    seed: int = 0
    match_reference: bool = False

    @model_validator(mode="after")
    def _reference_defaults(self) -> MosaicParams:
        ref = self.match_reference
        if self.count_with is None:
            self.count_with = "raw" if ref else "template"
        if self.force_numbering is None:
            self.force_numbering = not ref
        if self.alpha_sort is None:
            self.alpha_sort = "case_sensitive" if ref else "casefold"
        if self.budget < 1:
            raise ValueError(f"max_length {self.max_length} leaves no tokens (safety_margin {self.safety_margin})")
        return self

    @property
    def budget(self) -> int:
        """The largest accepted count: ``n < max_length`` (raw), ``n + safety_margin <= max_length`` (template)."""
        return self.max_length - 1 if self.count_with == "raw" else self.max_length - self.safety_margin


# -- random draws ---------------------------------------------------------------------------------

def epoch_seed(seed: int, epoch: int) -> int:
    """The epoch's RNG seed: a stable hash of (seed, epoch)."""
    return int(sha256_hex("mosaic_it", str(seed), str(epoch))[:16], 16)


def _logistic(rng: random.Random, scale: float = 2.0) -> float:
    u = rng.random()
    while u == 0.0:
        u = rng.random()
    return scale * math.log(u / (1.0 - u))


#: Tail draws r of the skewed chunk modes, as the reference draws them with numpy: the chunk size is
#: ``max_count - int(r)`` (truncation towards zero) for r < max_count (and r > 0 for ``logistic``).
#: ``pareto`` is the reference's ``np.random.pareto(1) - 1``: numpy's pareto is already Lomax (Pareto(1)
#: shifted to start at 0), so r is Lomax(1) - 1, in [-1, inf); r in (-1, 1) gives max_count, so
#: P(max_count) = F(2) / F(max_count + 1) with the Lomax CDF F(x) = x / (1 + x) (8/11 for max_count 10).
TAIL_DRAWS = {
    "exp": lambda rng: rng.expovariate(1.0),
    "pareto": lambda rng: rng.paretovariate(1.0) - 2.0,  # Pareto(1) on [1, inf) minus 2 = Lomax(1) - 1
    "lognormal": lambda rng: rng.lognormvariate(0.0, 1.0),
    "logistic": _logistic,  # scale 2, positive part
}


def chunk_size(rng: random.Random, mode: str, max_count: int, remaining: int) -> int:
    """Target rows for the next mosaic, in [1, min(max_count, remaining)] (``max_length``: remaining)."""
    if mode == "uniform":
        c = rng.randint(1, max_count)
    elif mode == "fix_max":
        c = max_count
    elif mode == "max_length":
        c = remaining
    else:
        tail = TAIL_DRAWS[mode]
        while True:
            r = tail(rng)
            if r < max_count and (r > 0.0 or mode != "logistic"):
                break
        c = max_count - int(r)  # int() truncates towards zero: r in (-1, 1) gives max_count
    return min(c, remaining)


@dataclass(frozen=True)
class Draw:
    """One prefix's indicators. Indices point into the lists of :mod:`curate.rewrite.mosaic_text`."""

    strategy: str  # format | permute | maskout
    number: int  # NUMBER_STYLES index; 0 = no numbering
    number_sep: int
    number_newline: bool
    delimiters: tuple[int, int, bool] | None  # (DELIMITER_WORDS, DELIMITER_BRACKETS, lower-case) or None
    format_meta: int | None  # FORMAT_WRAP_META (delimiters on) / FORMAT_PLAIN_META index; None = no meta
    joiner: int  # INSTRUCTION_JOINERS index
    layout: int  # LAYOUTS index of the format meta-instruction
    method: str | None = None  # permute / maskout method
    outer_meta: int | None = None  # index into the method's wording list
    outer_layout: int | None = None
    perm: tuple[int, ...] | None = None  # FIX: a permutation of range(m)
    seq_wrap: int | None = None  # FIX: SEQUENCE_WRAPS index
    seq_sep: int | None = None  # FIX: sequence separator index
    mask_ratio: float | None = None  # FIX / WORD_LONG / WORD_SHORT


def permute_wording(method: str, first_letter: bool) -> tuple[str, ...]:
    if first_letter and method in T.PERMUTE_META_FIRST_LETTER:
        return T.PERMUTE_META_FIRST_LETTER[method]
    return T.PERMUTE_META[method]


def draw(rng: random.Random, m: int, p: MosaicParams) -> Draw:
    """Fresh indicators for a render of m rows (m = 1 is always format). With ``force_numbering`` a
    permute or maskout draw takes one of the numbered styles (1..9); otherwise style 0 (none) is
    drawn like any other, about one time in ten."""
    strategy = rng.choice(STRATEGIES[p.version])
    if m == 1:
        strategy = "format"
    if p.force_numbering and strategy != "format":
        number = 1 + rng.randrange(len(T.NUMBER_STYLES) - 1)
    else:
        number = rng.randrange(len(T.NUMBER_STYLES))
    number_sep, newline = rng.randrange(len(T.NUMBER_SEPARATORS)), rng.random() < 0.5
    if rng.random() < 0.5:
        delimiters = (rng.randrange(len(T.DELIMITER_WORDS)), rng.randrange(len(T.DELIMITER_BRACKETS)), rng.random() < 0.5)
        format_meta = rng.randrange(len(T.FORMAT_WRAP_META))
    else:
        delimiters = None
        format_meta = None if rng.random() < 0.5 else rng.randrange(len(T.FORMAT_PLAIN_META))
    base = dict(strategy=strategy, number=number, number_sep=number_sep, number_newline=newline, delimiters=delimiters,
                format_meta=format_meta, joiner=rng.randrange(len(T.INSTRUCTION_JOINERS)), layout=rng.randrange(len(T.LAYOUTS)))
    if strategy == "format":
        return Draw(**base)
    if strategy == "permute":
        method = rng.choice(PERMUTE_METHODS)
        wording = permute_wording(method, p.match_reference)
        seps = T.PERMUTE_SEQUENCE_SEPARATORS
    else:
        method = rng.choice(MASKOUT_METHODS)
        wording = T.MASKOUT_META[method]
        seps = T.MASKOUT_SEQUENCE_SEPARATORS
    extra: dict[str, Any] = dict(method=method, outer_meta=rng.randrange(len(wording)), outer_layout=rng.randrange(len(T.LAYOUTS)))
    if strategy == "maskout" and method in ("FIX", "WORD_LONG", "WORD_SHORT"):
        extra["mask_ratio"] = rng.uniform(*T.MASK_RATIO_RANGE)
    if method == "FIX":
        extra.update(perm=tuple(rng.sample(range(m), m)), seq_wrap=rng.randrange(len(T.SEQUENCE_WRAPS)),
                     seq_sep=rng.randrange(len(seps)))
    return Draw(**base, **extra)


# -- orderings ------------------------------------------------------------------------------------

def permute_order(method: str, instructions: list[str], perm: tuple[int, ...] | None = None, casefold: bool = True) -> list[int]:
    """0-based positions of the instructions in the order their responses are written.

    Sorts are stable (equal keys keep instruction order, also when reversed). ALPHA sorts the whole
    instruction text (case-folded, or Python's case-sensitive order); LENGTH_WORD counts ``split()``
    words; ODD_EVEN puts 1-based odd positions first.
    """
    m = len(instructions)
    idx = range(m)
    if method == "FIX":
        return list(perm)
    if method == "REVERSE":
        return list(reversed(idx))
    if method == "ODD_EVEN":
        return list(range(0, m, 2)) + list(range(1, m, 2))
    if method == "EVEN_ODD":
        return list(range(1, m, 2)) + list(range(0, m, 2))
    keys = {
        "ALPHA": (lambda j: instructions[j].casefold()) if casefold else (lambda j: instructions[j]),
        "LENGTH_WORD": lambda j: len(instructions[j].split()),
        "LENGTH_CHAR": lambda j: len(instructions[j]),
    }
    reverse = method.startswith("REVERSE_")
    return sorted(idx, key=keys[method.removeprefix("REVERSE_")], reverse=reverse)


def mask_count(m: int, ratio: float) -> int:
    """k = max(floor(m * ratio), 1)."""
    return max(int(m * ratio), 1)


def maskout_positions(method: str, instructions: list[str], k: int | None = None, perm: tuple[int, ...] | None = None) -> list[int]:
    """Sorted 0-based positions of the instructions to ignore.

    FIX: the first k of ``perm``; WORD_LONG / WORD_SHORT: the k instructions with the most / fewest
    ``split()`` words (ties: lower position first); ODD / EVEN: the 1-based odd / even positions.
    """
    m = len(instructions)
    if method == "ODD":
        return list(range(0, m, 2))
    if method == "EVEN":
        return list(range(1, m, 2))
    if method == "FIX":
        return sorted(perm[:k])
    words = [len(s.split()) for s in instructions]
    return sorted(sorted(range(m), key=words.__getitem__, reverse=method == "WORD_LONG")[:k])


# -- rendering ------------------------------------------------------------------------------------
# A render is two piece lists: a piece is literal text (str) or a reference (int) to a row's text:
# row j's instruction is 2*j, its response 2*j + 1 (j = position in the mosaic, 0-based). Literal
# pieces are kept apart (a tag, a delimiter, a joiner, a wording with its delimiters cut out), so
# that the few distinct literals are tokenized once each for the estimates.

def number_tag(d: Draw, i: int) -> str:
    """The tag before instruction i and response i (1-based i); empty without numbering."""
    return _tag(d.number, d.number_sep, d.number_newline, i)


@functools.lru_cache(maxsize=4096)
def _tag(number: int, sep: int, newline: bool, i: int) -> str:
    if number == 0:
        return ""
    return T.fill(T.NUMBER_STYLES[number], i=i) + T.NUMBER_SEPARATORS[sep] + ("\n" if newline else " ")


def response_delimiters(d: Draw) -> tuple[str, str]:
    """(begin, end) written around each response; empty strings without delimiters."""
    return _delimiters(d.delimiters)


@functools.lru_cache(maxsize=4096)
def _delimiters(choice: tuple[int, int, bool] | None) -> tuple[str, str]:
    if choice is None:
        return "", ""
    w, b, lower = choice
    begin, end = T.DELIMITER_WORDS[w]
    if lower:
        begin, end = begin.lower(), end.lower()
    return T.fill(T.DELIMITER_BRACKETS[b], x=begin), T.fill(T.DELIMITER_BRACKETS[b], x=end)


def format_meta(d: Draw) -> list[str]:
    """The format meta-instruction as pieces (wording and delimiters apart); [] when there is none."""
    return list(_format_meta(d.format_meta, d.delimiters))


@functools.lru_cache(maxsize=16384)
def _format_meta(index: int | None, delimiters: tuple[int, int, bool] | None) -> tuple[str, ...]:
    if index is None:
        return ()
    if delimiters is None:
        return (T.FORMAT_PLAIN_META[index],)
    begin, end = _delimiters(delimiters)
    return tuple(T.fill_pieces(T.FORMAT_WRAP_META[index], begin=begin, end=end))


def _sequence(d: Draw, positions: list[int], separators: tuple[str, ...]) -> str:
    seq = separators[d.seq_sep].join(str(j + 1) for j in positions)
    return T.fill(T.SEQUENCE_WRAPS[d.seq_wrap], seq=seq)


def outer_meta(d: Draw, order: list[int], masked: list[int], first_letter: bool) -> list[str]:
    """The permute / maskout meta-instruction as pieces (a FIX sequence apart from the wording)."""
    if d.strategy == "permute":
        text = permute_wording(d.method, first_letter)[d.outer_meta]
        if d.method != "FIX":
            return [text]
        return T.fill_pieces(text, seq=_sequence(d, order, T.PERMUTE_SEQUENCE_SEPARATORS))
    text = T.MASKOUT_META[d.method][d.outer_meta]
    if d.method == "FIX":
        return T.fill_pieces(text, seq=_sequence(d, masked, T.MASKOUT_SEQUENCE_SEPARATORS))
    k = len(masked)
    return [T.fill(text, k=k, s="" if k == 1 else "s")]


def _place(meta: list[str], block: list, layout: int) -> list:
    """The block with its meta-instruction before or after it (nothing added when meta is empty)."""
    if not meta:
        return block
    meta_first, sep = T.LAYOUTS[layout]
    return [*meta, sep, *block] if meta_first else [*block, sep, *meta]


def _pieces(pieces: list) -> list:
    """The pieces without empty literals."""
    return [p for p in pieces if p != ""]


@dataclass
class Rendered:
    instruction: list  # pieces
    response: list  # pieces
    order: list[int]  # 0-based positions whose responses are written, in writing order
    masked: list[int]  # 0-based positions left unanswered (maskout)


def render(d: Draw, instructions: list[str], casefold: bool = True, first_letter: bool = False) -> Rendered:
    """Render a mosaic of ``len(instructions)`` rows as piece lists (see the comment above)."""
    m = len(instructions)
    tags = [number_tag(d, j + 1) for j in range(m)]
    block: list = []
    for j in range(m):
        if j:
            block.append(T.INSTRUCTION_JOINERS[d.joiner])
        block += [tags[j], 2 * j]
    order, masked = list(range(m)), []
    if d.strategy == "permute":
        order = permute_order(d.method, instructions, d.perm, casefold)
    elif d.strategy == "maskout":
        k = mask_count(m, d.mask_ratio) if d.mask_ratio is not None else None
        masked = maskout_positions(d.method, instructions, k, d.perm)
        hidden = set(masked)
        order = [j for j in range(m) if j not in hidden]
    begin, end = response_delimiters(d)
    response: list = []
    for n, j in enumerate(order):
        if n:
            response.append(T.RESPONSE_JOINER)
        response += [tags[j], begin, 2 * j + 1, end]
    instruction = _place(format_meta(d), block, d.layout)
    if d.strategy != "format":
        instruction = _place(outer_meta(d, order, masked, first_letter), instruction, d.outer_layout)
    return Rendered(_pieces(instruction), _pieces(response), order, masked)


# -- the run --------------------------------------------------------------------------------------

@dataclass
class MosaicRow:
    """One derived row. ``parents`` are the composed rows' sample_ids in instruction order."""

    epoch: int
    instruction: str
    response: str
    count: int
    parents: list[str]
    strategy: str
    method: str | None
    choices: dict[str, Any]  # every drawn indicator, plus 1-based ``order`` / ``masked``
    n_tokens: int  # exact count under count_with (chat template included; margin not included)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Passthrough:
    sample_id: str
    reason: str  # multiturn | system | overlong


@dataclass
class MosaicResult:
    rows: list[MosaicRow]
    passthrough: list[Passthrough]
    overlong: list[list[str]]  # per epoch: sample_ids whose render alone was over the cap, in epoch order
    stats: dict[str, Any] = field(default_factory=dict)
    never_composed: list[str] = field(default_factory=list)  # over the cap alone and in no mosaic of any epoch


def composable(record: dict[str, Any]) -> str | None:
    """None when the record is a plain [user, assistant] pair; else why it is passed through."""
    msgs = record["messages"]
    roles = [m["role"] for m in msgs]
    tool_use = record.get("tools") or any(m.get("tool_calls") for m in msgs)
    if roles == ["user", "assistant"] and not tool_use:
        return None
    if roles == ["system", "user", "assistant"] and not tool_use:
        return "system"
    return "multiturn"


@dataclass
class _Chunk:
    """One step of an epoch: where it started, the RNG state before its size draw, what it kept."""

    start: int
    state: tuple
    items: list[int]  # row positions of the prefixes tried
    m: int = 0  # rows kept (0: the first row is over-length)
    draw: Draw | None = None
    rendered: Rendered | None = None
    text: tuple[str, str] | None = None  # (instruction, response) once joined
    n_tokens: int | None = None  # None until counted exactly


#: Chunks decided from estimates before their accepted renders are counted exactly in one batch.
VERIFY_WINDOW = 256
#: Most literal token counts kept.
LITERAL_CACHE = 100_000


class _Composer:
    """The per-epoch loop over prepared rows: texts, token counts, the literal-count cache."""

    def __init__(self, ids: list[str], texts: list[str], counter: TokenCounter, p: MosaicParams, every_prefix: bool):
        self.ids, self.texts, self.counter, self.p, self.exact = ids, texts, counter, p, every_prefix
        self.counts = counter.count_many(texts) if texts and not every_prefix else []
        self.literal: dict[str, int] = {}
        self.base_order = sorted(range(len(ids)), key=lambda g: (ids[g], g))  # independent of input order
        self.n_prefixes = self.n_fallbacks = 0

    def join(self, pieces: list, items: list[int]) -> str:
        texts = self.texts
        return "".join(p if type(p) is str else texts[2 * items[p >> 1] + (p & 1)] for p in pieces)

    def estimate(self, pieces: list, items: list[int]) -> int:
        """Sum of the pieces' own token counts (literals counted once and cached)."""
        total = 0
        for p in pieces:
            if type(p) is str:
                n = self.literal.get(p)
                if n is None:
                    if len(self.literal) >= LITERAL_CACHE:  # FIX sequences are mostly unique: bound the cache
                        self.literal.clear()
                    n = self.literal[p] = self.counter.count(p)
                total += n
            else:
                total += self.counts[2 * items[p >> 1] + (p & 1)]
        return total

    def fits(self, r: Rendered, items: list[int], exact: bool) -> tuple[bool, int | None]:
        """(fits under the budget?, exact count or None when the estimate decided)."""
        budget = self.p.budget
        if not exact:
            pieces = self.counter.framed(r.instruction, r.response)
            est, slack = self.estimate(pieces, items), JOIN_SLACK * (len(pieces) - 1)
            if est + slack <= budget:
                return True, None
            if est - slack > budget:
                return False, None
        n = self.counter.exact(self.join(r.instruction, items), self.join(r.response, items))
        return n <= budget, n

    def step(self, order: list[int], start: int, rng: random.Random, exact: bool) -> _Chunk:
        """Draw a chunk size at ``start`` and grow the chunk: the longest prefix that fits (one
        draw per prefix tried, as the reference)."""
        p = self.p
        c = _Chunk(start, rng.getstate(), [])
        size = chunk_size(rng, p.chunk, p.max_count, len(order) - start)
        instructions = []
        for m in range(1, size + 1):  # items grow with m: a max_length chunk costs what it uses
            c.items.append(order[start + m - 1])
            instructions.append(self.texts[2 * c.items[-1]])
            self.n_prefixes += 1
            d = draw(rng, m, p)
            r = render(d, instructions[:m], p.alpha_sort == "casefold", p.match_reference)
            ok, n = self.fits(r, c.items, exact)
            if not ok:
                break
            c.m, c.draw, c.rendered, c.n_tokens = m, d, r, n
        if c.m:
            c.text = (self.join(c.rendered.instruction, c.items), self.join(c.rendered.response, c.items))
        return c

    def first_over(self, window: list[_Chunk]) -> int | None:
        """Count the window's accepted renders not yet counted exactly (one batch); the index of the
        first one over the budget, or None."""
        todo = [c for c in window if c.m and c.n_tokens is None]
        counts = self.counter.count_many([self.counter.render(*c.text) for c in todo])
        self.counter.n_exact += len(todo)
        for c, n in zip(todo, counts):
            c.n_tokens = n
        return next((k for k, c in enumerate(window) if c.m and c.n_tokens > self.p.budget), None)

    def epoch(self, e: int) -> tuple[list[MosaicRow], list[int]]:
        """(rows, positions of the rows over-length in this epoch)."""
        rng = random.Random(epoch_seed(self.p.seed, e))
        order = list(self.base_order)
        rng.shuffle(order)
        rows, overlong = [], []
        i = 0
        while i < len(order):
            window: list[_Chunk] = []
            while i < len(order) and len(window) < VERIFY_WINDOW:
                window.append(self.step(order, i, rng, self.exact))
                i = window[-1].start + max(window[-1].m, 1)
            bad = self.first_over(window)
            if bad is not None:  # an estimate was off by more than its slack: redo from that chunk, exactly
                self.n_fallbacks += 1
                redo = window[bad]
                rng.setstate(redo.state)
                window[bad:] = [self.step(order, redo.start, rng, True)]
                i = redo.start + max(window[-1].m, 1)
            for c in window:
                if c.m:
                    rows.append(self.row(e, c))
                else:
                    overlong.append(c.items[0])
        return rows, overlong

    def row(self, e: int, c: _Chunk) -> MosaicRow:
        r, d = c.rendered, c.draw
        choices = {"text": f"{T.TEXT_ID}/{T.TEXT_VERSION}"}
        for f in fields(d):
            value = getattr(d, f.name)
            if value is not None and f.name not in ("strategy", "method"):
                choices[f.name] = value
        choices.update(order=[j + 1 for j in r.order], masked=[j + 1 for j in r.masked])
        return MosaicRow(e, c.text[0], c.text[1], c.m, [self.ids[g] for g in c.items[:c.m]], d.strategy, d.method,
                         choices, c.n_tokens)


class MosaicIT:
    """Mosaic-IT over canonical records: ``MosaicIT(params).run(records)`` → :class:`MosaicResult`."""

    method = "mosaic_it"
    version = "1.1"  # 1.1: the pareto chunk mode draws the reference's np.random.pareto(1) - 1
    Params = MosaicParams

    def __init__(self, params: dict[str, Any] | MosaicParams | None = None, tokenizer: Any = None):
        self.params = params if isinstance(params, MosaicParams) else MosaicParams.model_validate(params or {})
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.params.tokenizer)
        return self._tokenizer

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the output: method, version, parameters, wording, tokenizer."""
        from curate.models import model_revision

        return {"method": self.method, "rewriter_version": self.version, "params": self.params.model_dump(mode="json"),
                "text": T.text_ref(), "tokenizer_revision": model_revision(self.params.tokenizer)}

    def run(self, records: list[dict[str, Any]], every_prefix: bool = False) -> MosaicResult:
        """Compose ``records`` (not modified). ``every_prefix=True`` counts every prefix exactly (the
        reference's loop; slow, same output)."""
        p = self.params
        ids, texts, passthrough = split_records(records)
        counter = TokenCounter(self.tokenizer, p.count_with)
        composer = _Composer(ids, texts, counter, p, every_prefix)
        rows, overlong = [], []
        for e in range(p.epochs):
            epoch_rows, epoch_overlong = composer.epoch(e)
            rows += epoch_rows
            overlong.append([ids[g] for g in epoch_overlong])
        composed = {sid for row in rows for sid in row.parents}
        never = [sid for sid in dict.fromkeys(sid for epoch in overlong for sid in epoch) if sid not in composed]
        if p.passthrough_overlong:
            passthrough += [Passthrough(sid, "overlong") for sid in never]
        stats = {
            "n_input": len(records),
            "n_composable": len(ids),
            "n_multiturn_passthrough": sum(x.reason == "multiturn" for x in passthrough),
            "n_system_passthrough": sum(x.reason == "system" for x in passthrough),
            "n_overlong": sum(map(len, overlong)),
            "n_overlong_per_epoch": [len(x) for x in overlong],
            "n_overlong_never_composed": len(never),
            "n_mosaics_per_epoch": [sum(r.epoch == e for r in rows) for e in range(p.epochs)],
            "n_rows": len(rows),
            "n_passthrough": len(passthrough),
            "n_prefixes": composer.n_prefixes,
            "n_exact_counts": counter.n_exact,
            "n_tokens_tokenized": counter.n_tokens,
            "n_estimate_fallbacks": composer.n_fallbacks,
        }
        return MosaicResult(rows, passthrough, overlong, stats, never)


def split_records(records: list[dict[str, Any]]) -> tuple[list[str], list[str], list[Passthrough]]:
    """(sample_ids of the composable rows, their texts [instruction, response, ...] stripped, the
    other rows as passthrough entries in input order)."""
    ids, texts, passthrough = [], [], []
    for rec in records:
        reason = composable(rec)
        if reason is not None:
            passthrough.append(Passthrough(rec["sample_id"], reason))
            continue
        user, assistant = rec["messages"]
        ids.append(rec["sample_id"])
        texts += [user["content"].strip(), assistant["content"].strip()]
    return ids, texts, passthrough


# -- the rewrite step --------------------------------------------------------------------------------


class MosaicStep(Rewriter):
    """The ``mosaic`` rewrite step of a flow: :class:`MosaicIT` over the selected rows.

    Each mosaic becomes a derived row ``[user: instruction, assistant: response]`` with its parents
    (in instruction order), origin ``mosaic:<strategy>`` and a generation record (epoch, count,
    every drawn choice, the wording id and version, the tokenizer, the exact token count). Rows that
    are not composable (multi-turn, tool use, a system message) pass through; rows too long for any
    mosaic are dropped with reason ``overlong`` (or pass through with ``passthrough_overlong``). The
    whole run is one unit of work (all epochs: Mosaic-IT needs no model; 20k rows × 4 epochs take about
    30 s of CPU, bench/results/mosaic.md); the seed derives from the run seed and ``seed``.
    """

    method = "mosaic"
    version = MosaicIT.version
    Params = MosaicParams

    def engine(self) -> MosaicIT:
        seed = int(sha256_hex(str(self.context.seed), "mosaic", str(self.params.seed))[:15], 16)
        return MosaicIT(self.params.model_copy(update={"seed": seed}))

    def fingerprint(self) -> dict[str, Any]:
        return {**self.engine().fingerprint(), "run_seed": self.context.seed}

    def run_unit(self, unit: str, records: list[dict[str, Any]]) -> UnitResult:
        engine = self.engine()
        result = engine.run(records)
        out = UnitResult(stats=result.stats)
        tokenizer = self.params.tokenizer
        for row in result.rows:
            messages = [{"role": "user", "content": row.instruction, "tool_calls": None},
                        {"role": "assistant", "content": row.response, "tool_calls": None}]
            generation = {"method": "mosaic", "version": self.version, "text": T.text_ref(), "tokenizer": tokenizer,
                          "count_with": engine.params.count_with, "seed": engine.params.seed, "epoch": row.epoch, "count": row.count,
                          "strategy": row.strategy, "strategy_method": row.method, "choices": row.choices, "n_tokens": row.n_tokens}
            out.derive(messages, row.parents, row.strategy, generation,
                       original={"instruction": row.instruction, "output": row.response, "count": row.count})
        cap = f"{self.params.max_length} tokens ({engine.params.count_with} count)"
        for x in result.passthrough:
            out.dispositions.setdefault(x.sample_id, ("passthrough", x.reason, None))
        for sid in result.never_composed:  # with passthrough_overlong they passed through above
            out.dispositions.setdefault(sid, ("dropped", "overlong", f"longer than the mosaic cap of {cap} on its own, in every epoch"))
        return out
