"""Cheap text statistics and degenerate-response detection. No model; columnar (numpy over code points).

Outputs (per row, over the whole conversation):

===================  =========================================================================
``prompt_chars``     characters of all system/user/tool text
``response_chars``   characters of all assistant text
``prompt_tokens``    tokens of the prompt side (``tokenizer``: ``regex`` = words and punctuation
                     marks, or any HF tokenizer id/dir)
``response_tokens``  tokens of the assistant side
``turns``            number of assistant messages
``repetition``       fraction of the response's word n-grams (``ngram``, default 10) that repeat an
                     earlier one (0–1); text stuck in a loop scores ~0.9, normal prose and code < 0.35
``degenerate``       1.0 when the response is degenerate, else 0.0; ``components.reasons`` says why:
                     ``no_alnum`` (no letter or digit), ``copies_prompt`` (response = prompt),
                     ``repetitive`` (repetition > ``max_repetition``), ``char_run`` (one character
                     is over half of the response)
===================  =========================================================================

How it is computed. The definitions are those of :func:`_reference_scores` (Python ``re`` and
``collections.Counter``, one row at a time), which stays here as the specification; the scorer itself
works on a chunk of rows at once (:meth:`HeuristicScorer.score_table`):

- prompt and response texts are joined from the Arrow ``messages`` column (``pyarrow.compute``), the
  same strings :func:`curate.records.prompt_text` / :func:`~curate.records.response_text` give;
- each chunk of texts is decoded once from its UTF-8 bytes with numpy (one byte of class bits and the
  lower-case code point per character); ``\\w``, ``\\s``, "letter or digit" and ``str.lower`` come from
  one lookup table built from this Python's own ``str`` methods (``\\w`` of ``re`` is exactly
  ``str.isalnum() or '_'``, ``\\s`` is ``str.isspace()``; the tests check every code point), so the
  classes are those of the reference, whatever the Unicode version;
- token counts, character counts and the "most common character" share are counts per row
  (``np.add.reduceat``, ``np.bincount``); words and word n-grams are hashed (polynomial over the
  lower-case code points, then over the word hashes) and repeated n-grams found by one sort; every pair
  of equal hashes is then checked code point by code point, so a hash collision cannot change a value
  (the row is then scored by the reference).

Rows whose text holds ``İ`` (U+0130, whose lower case is two code points) or ``Σ`` (U+03A3, whose lower
case depends on its neighbours) are scored by the reference function: the lookup table of ``str.lower``
is per code point.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.arrays import concat_ranges
from curate.records import prompt_text, response_text
from curate.scorers.base import Score, ScoreColumns, Scorer

#: one token of ``tokenizer: regex`` (the token counts; plan's estimates): a run of word characters or one punctuation mark
TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_WORD = re.compile(r"\w+", re.UNICODE)
_ALNUM = re.compile(r"[^\W_]", re.UNICODE)

REASONS = ("no_alnum", "copies_prompt", "repetitive", "char_run")  # the order of components.reasons
_N_CODEPOINTS = 0x110000
_SPECIAL = (0x130, 0x3A3)  # lower() is not one code point (İ) or depends on the context (Σ)


def repetition_ratio(text: str, n: int = 10) -> tuple[float, int]:
    """(fraction of word n-grams that repeat an earlier one, number of n-grams)."""
    words = _WORD.findall(text.lower())
    count = len(words) - n + 1
    if count <= 0:
        return 0.0, 0
    grams = Counter(tuple(words[i : i + n]) for i in range(count))
    return (count - len(grams)) / count, count


def _reference_row(messages: list[dict[str, Any]], p: Any, ptok: int, rtok: int) -> tuple[dict[str, float], dict[str, Any], int]:
    """One row, the definition: (values, components, prompt tokens + response tokens)."""
    prompt, resp = prompt_text(messages), response_text(messages)
    rep, ngrams = repetition_ratio(resp, p.ngram)
    reasons = []
    if not _ALNUM.search(resp) and not any(m.get("tool_calls") for m in messages):
        reasons.append("no_alnum")
    if resp.strip().lower() == prompt.strip().lower():
        reasons.append("copies_prompt")
    if ngrams >= p.min_ngrams and rep > p.max_repetition:
        reasons.append("repetitive")
    chars = [c for c in resp if not c.isspace()]
    if len(chars) >= p.min_chars_for_share:
        top = Counter(chars).most_common(1)[0][1]
        if top / len(chars) > p.max_char_share:
            reasons.append("char_run")
    values = {
        "prompt_chars": float(len(prompt)),
        "response_chars": float(len(resp)),
        "prompt_tokens": float(ptok),
        "response_tokens": float(rtok),
        "turns": float(sum(m["role"] == "assistant" for m in messages)),
        "repetition": rep,
        "degenerate": 1.0 if reasons else 0.0,
    }
    return values, {"reasons": reasons, "ngrams": ngrams}, ptok + rtok


def _reference_scores(records: list[dict[str, Any]], p: Any, count_tokens) -> list[Score]:
    """The per-row definition of every output (Python ``re`` + ``Counter``); the columnar path must equal it."""
    ptoks = count_tokens([prompt_text(r["messages"]) for r in records])
    rtoks = count_tokens([response_text(r["messages"]) for r in records])
    out = []
    for rec, pt, rt in zip(records, ptoks, rtoks):
        values, comp, used = _reference_row(rec["messages"], p, pt, rt)
        out.append(Score(values, components=comp, n_tokens_in=used, n_tokens_used=used))
    return out


# -- character classes as lookup tables over code points ---------------------------------------------

WORD, SPACE, ALNUM, SPECIAL = 1 << 24, 1 << 25, 1 << 26, 1 << 27  # class bits above the 21 bits of a code point
CP = (1 << 21) - 1


@functools.lru_cache(maxsize=1)
def _table() -> np.ndarray:
    """One uint32 per code point: ``str.lower`` of that code point alone (the code point itself where that
    is not one code point) in the low 21 bits, and class bits: ``WORD`` (re ``\\w``), ``SPACE`` (re
    ``\\s``), ``ALNUM`` (re ``[^\\W_]``), ``SPECIAL`` (rows that take the reference path). Built from this
    Python's ``str`` methods (~0.5 s, once per process)."""
    n = _N_CODEPOINTS
    alnum = np.fromiter((chr(i).isalnum() for i in range(n)), dtype=bool, count=n)
    tab = np.fromiter((ord(low) if len(low := chr(i).lower()) == 1 else i for i in range(n)), dtype=np.uint32, count=n)
    tab[alnum] |= WORD | ALNUM
    tab[ord("_")] |= WORD
    tab[[i for i in range(0x3100) if chr(i).isspace()]] |= SPACE  # no white space above U+3000
    tab[list(_SPECIAL)] |= SPECIAL
    return tab


# class bits of one code point, one byte each (``_Texts.cls``); the ASCII ones come from ``_table()``
C_WORD, C_SPACE, C_ALNUM, C_WIDE = 1, 2, 4, 8  # C_WIDE: not ASCII (decoded and classed one by one)


@functools.lru_cache(maxsize=1)
def _byte_tables() -> tuple[bytes, bytes]:
    """``bytes.translate`` tables over the first byte of each UTF-8 character: (class byte, lower case).
    ASCII bytes get the class bits and ``str.lower`` of ``_table()``; bytes from 0x80 get ``C_WIDE`` and
    themselves (those characters are decoded and looked up in ``_table()`` afterwards)."""
    tab = _table()
    cls, low = bytearray(256), bytearray(256)
    for i in range(256):
        if i < 128:
            info = int(tab[i])
            cls[i] = (C_WORD if info & WORD else 0) | (C_SPACE if info & SPACE else 0) | (C_ALNUM if info & ALNUM else 0)
            low[i] = info & CP
        else:
            cls[i], low[i] = C_WIDE, i
    return bytes(cls), bytes(low)


def _counts(mask: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per row (``starts``/``lengths`` into ``mask``): how many entries ``mask`` marks (a bool or 0/1 uint8 array)."""
    out = np.zeros(len(starts), dtype=np.int64)
    nz = np.flatnonzero(lengths > 0)
    if len(nz) == 0:
        return out
    # rows lie back to back, so a sum from one non-empty row's start to the next one's is that row's
    # count; empty rows are left out of the indices (an empty last row would cut the row before it short)
    out[nz] = np.add.reduceat(mask.view(np.uint8), starts[nz], dtype=np.int32)  # rows < 2**31 code points
    return out


class _Texts:
    """One string per row, decoded into code points (the rows back to back), with ``starts``/``lengths``
    per row and, per code point: ``first`` (uint8, its first UTF-8 byte: the code point where < 0x80),
    ``low`` (uint32, ``str.lower`` of the code point alone,
    as in ``_table()``) and ``cls`` (uint8 ``C_*`` bits). ``wide``/``wide_cps``: position and code point of
    every non-ASCII character; ``special``: rows holding a ``SPECIAL`` code point.

    The UTF-8 bytes are decoded with numpy: the first byte of each character is kept, ASCII is classed
    and lower-cased with ``bytes.translate`` (one byte per code point), and only the non-ASCII characters
    are decoded from their bytes and looked up in ``_table()``."""

    def __init__(self, strings: pa.Array):
        strings = pc.fill_null(strings, "").cast(pa.large_string())
        n = len(strings)
        offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64, count=n + 1, offset=strings.offset * 8)
        data = strings.buffers()[2]
        raw = np.zeros(0, np.uint8) if data is None or n == 0 else np.frombuffer(data, np.uint8, count=int(offsets[-1] - offsets[0]),
                                                                                 offset=int(offsets[0]))
        self.n = n
        self.lengths = pc.utf8_length(strings).to_numpy(zero_copy_only=False).astype(np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths
        # first bytes of non-ASCII characters
        wide_bytes = np.flatnonzero(raw >= 0xC0) if len(raw) and raw.max() >= 0x80 else np.zeros(0, np.int64)
        if len(wide_bytes):
            lead = raw[(raw & 0xC0) != 0x80]  # the first byte of every character
            cont = np.flatnonzero((raw & 0xC0) == 0x80)
            self.wide = wide_bytes - np.searchsorted(cont, wide_bytes)  # code point index = byte index - continuation bytes before it
            self.wide_cps = _decode_utf8(raw, wide_bytes)
        else:
            lead = raw
            self.wide = np.zeros(0, np.int64)
            self.wide_cps = np.zeros(0, np.uint32)
        cls_table, low_table = _byte_tables()
        lead_bytes = lead.tobytes()
        self.cls = np.frombuffer(bytearray(lead_bytes.translate(cls_table)), np.uint8)
        self.low = np.frombuffer(lead_bytes.translate(low_table), np.uint8).astype(np.uint32)
        self.first = lead
        self.special = np.zeros(n, dtype=bool)
        if len(self.wide):
            info = _table()[self.wide_cps]
            self.low[self.wide] = info & CP
            self.cls[self.wide] = (C_WIDE | np.where(info & WORD, C_WORD, 0) | np.where(info & SPACE, C_SPACE, 0)
                                   | np.where(info & ALNUM, C_ALNUM, 0)).astype(np.uint8)
            self.special[self.row_of(self.wide[(info & SPECIAL) != 0])] = True

    def per_row(self, mask: np.ndarray) -> np.ndarray:
        return _counts(mask, self.starts, self.lengths)

    def row_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts + self.lengths, positions, "right")

    def has(self, bits: int) -> np.ndarray:
        """bool per code point: any of the class ``bits``."""
        return (self.cls & bits).astype(bool)


def _decode_utf8(raw: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Code points of the multi-byte UTF-8 characters whose first bytes are at ``first`` in ``raw``."""
    lead = raw[first].astype(np.uint32)
    size = 2 + (lead >= 0xE0) + (lead >= 0xF0)
    cp = lead & np.where(size == 2, 0x1F, np.where(size == 3, 0x0F, 0x07)).astype(np.uint32)
    for k in range(1, 4):
        more = size > k
        nxt = raw[np.minimum(first + k, len(raw) - 1)].astype(np.uint32) & 0x3F
        cp = np.where(more, (cp << 6) | nxt, cp)
    return cp


def _words(t: _Texts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, one past last) code point of each run of word characters, runs never crossing rows, and the
    number of runs per row."""
    word = t.has(C_WORD)
    step = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))  # +1 where a run starts, -1 after it ends
    ws, we = np.flatnonzero(step == 1), np.flatnonzero(step == -1)
    inner = t.starts[(t.starts > 0) & (t.lengths > 0)]
    cut = inner[word[inner] & word[inner - 1]]  # a run that goes on into the next row: split it there
    if len(cut):
        ws = np.insert(ws, np.searchsorted(ws, cut), cut)
        we = np.insert(we, np.searchsorted(we, cut), cut)
    bounds = np.append(t.starts, len(word))
    return ws, we, np.diff(np.searchsorted(ws, bounds))


def _regex_tokens(t: _Texts, n_words: np.ndarray) -> np.ndarray:
    """len(re.findall(r"\\w+|[^\\w\\s]", text)) per row: runs of word characters + other non-space characters."""
    return n_words + t.per_row((t.cls & (C_WORD | C_SPACE)) == 0)


def _strip_bounds(t: _Texts) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each row's text without leading/trailing white space (``str.strip()``)."""
    start, length = t.starts.copy(), t.lengths.copy()
    nz = np.flatnonzero(length > 0)
    space = t.cls[np.concatenate((t.starts[nz], t.starts[nz] + t.lengths[nz] - 1))] & C_SPACE
    edge = nz[(space[: len(nz)] | space[len(nz):]) != 0]  # rows that start or end with white space
    if len(edge):
        lens = t.lengths[edge]
        pos = concat_ranges(t.starts[edge], lens)
        keep = (t.cls[pos] & C_SPACE) == 0
        first = np.where(keep, pos, np.iinfo(np.int64).max)
        last = np.where(keep, pos, -1)
        at = np.cumsum(lens) - lens
        lo, hi = np.minimum.reduceat(first, at), np.maximum.reduceat(last, at)
        blank = hi < 0
        start[edge] = np.where(blank, t.starts[edge], lo)
        length[edge] = np.where(blank, 0, hi - lo + 1)
    return start, length


def _copies_prompt(resp: _Texts, prompt: _Texts) -> np.ndarray:
    """resp.strip().lower() == prompt.strip().lower() per row (rows without special code points)."""
    rs, rl = _strip_bounds(resp)
    ps, pl = _strip_bounds(prompt)
    same = rl == pl
    cand = np.flatnonzero(same & (rl > 0))
    if len(cand):
        lens = rl[cand]
        k = concat_ranges(0, lens)
        a = resp.low[np.repeat(rs[cand], lens) + k]
        b = prompt.low[np.repeat(ps[cand], lens) + k]
        differ = np.bincount(np.repeat(np.arange(len(cand)), lens)[a != b], minlength=len(cand)) > 0
        same[cand[differ]] = False
    return same


def _char_share_exceeds(t: _Texts, min_chars: int, max_share: float) -> np.ndarray:
    """Per row: at least ``min_chars`` non-space characters and the most common one over ``max_share`` of them.

    ASCII characters are counted in a 256-bin histogram per row over the first byte of each character
    (one ``np.bincount``); the bins of ASCII white space and of bytes from 0x80 (non-ASCII) are left out. Non-ASCII
    characters (few) are counted exactly per (row, code point) from ``t.wide``/``t.wide_cps``."""
    rows = np.repeat(np.arange(0, t.n * 256, 256, dtype=np.int64), t.lengths)
    rows += t.first
    hist = np.bincount(rows, minlength=t.n * 256).reshape(t.n, 256)
    counted = hist[:, np.flatnonzero(np.frombuffer(_byte_tables()[0][:128], np.uint8) & C_SPACE == 0)]
    total = counted.sum(axis=1)
    top = counted.max(axis=1) if t.n else np.zeros(0, np.int64)
    if len(t.wide):
        keep = (t.cls[t.wide] & C_SPACE) == 0
        rows = t.row_of(t.wide[keep])
        total += np.bincount(rows, minlength=t.n)
        uniq, n_each = np.unique(rows * _N_CODEPOINTS + t.wide_cps[keep].astype(np.int64), return_counts=True)
        np.maximum.at(top, uniq // _N_CODEPOINTS, n_each)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (total >= min_chars) & (top / np.maximum(total, 1) > max_share)


_B = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible modulo 2**64
_B32 = np.uint32(0x9E3779B1)  # odd: invertible modulo 2**32
_MIX = np.random.default_rng(20240613).integers(1, 2**63, size=3, dtype=np.uint64) | np.uint64(1)

_POWERS: dict[Any, tuple[np.ndarray, np.ndarray]] = {}


def _powers(size: int, base: Any) -> tuple[np.ndarray, np.ndarray]:
    """(base**k, base**-k) in the integer type of ``base`` (modulo 2**32 or 2**64) for k < at least ``size``;
    the largest made so far is kept per base and reused."""
    key = (base.dtype, int(base))
    if key not in _POWERS or len(_POWERS[key][0]) < size:
        inv = base.dtype.type(pow(int(base), -1, 2 ** (8 * base.dtype.itemsize)))
        _POWERS[key] = (_pow_seq(size, base), _pow_seq(size, inv))
    return _POWERS[key]


def _pow_seq(n: int, base: Any) -> np.ndarray:
    out = np.empty(n, dtype=base.dtype)
    if n:
        out[0] = 1
        out[1:] = base
        with np.errstate(over="ignore"):
            np.multiply.accumulate(out, out=out)
    return out


def _ngram_repeats(t: _Texts, word_starts: np.ndarray, word_ends: np.ndarray, n_words: np.ndarray,
                   n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of lower-cased text: (word n-grams, n-grams equal to an earlier one, rows to score by the
    reference because two different n-grams shared a hash).

    Words are those of the original text: a code point and its lower case are both ``\\w`` or both not
    (checked for every code point by the tests).

    1. each word gets a 32-bit polynomial hash of its lower-case code points (one prefix sum over the
       chunk, modulo 2**32), mixed with its length into 64 bits;
    2. each n-gram (n consecutive words of one row) gets a 64-bit polynomial hash of its word hashes
       (a prefix sum over the words), plus its row times a constant;
    3. the high bits of that hash and the n-gram's index in the low bits make one uint64 key; one
       ``np.sort`` puts equal hashes side by side, in order of position;
    4. every side-by-side pair with equal hashes is checked word by word and code point by code point:
       a true pair makes the later n-gram a repeat, any other pair sends both rows to the reference."""
    count = np.maximum(n_words - n + 1, 0)
    repeats = np.zeros(t.n, dtype=np.int64)
    collided = np.zeros(t.n, dtype=bool)
    n_all = len(word_starts)
    if not count.any():
        return count, repeats, collided
    pw32, inv32 = _powers(1 << max(10, (len(t.low) + 1).bit_length()), _B32)
    pw, inv = _powers(1 << max(10, (n_all + 1).bit_length()), _B)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(t.low) + 1, dtype=np.uint32)
        np.cumsum(t.low * pw32[: len(t.low)], out=prefix[1:])
        wh = ((prefix[word_ends] - prefix[word_starts]) * inv32[word_starts]).astype(np.uint64)  # 1.
        wh *= _MIX[0]
        wh ^= (word_ends - word_starts).astype(np.uint64) * _MIX[1]
        gpre = np.zeros(n_all + 1, dtype=np.uint64)  # 2.
        np.cumsum(wh * pw[:n_all], out=gpre[1:])
        span = n_all - n + 1
        wrow = np.repeat(np.arange(t.n), n_words)
        g = np.flatnonzero(wrow[:span] == wrow[n - 1 :])  # n-gram starts: first and last word in one row
        grow = wrow[g]
        h = (gpre[g + n] - gpre[g]) * inv[g] + grow.astype(np.uint64) * _MIX[2]
    bits = max(1, int(n_all).bit_length())
    if bits <= 24:  # 3.: at least 40 bits of hash in the key
        low_mask = np.uint64((1 << bits) - 1)
        key = np.sort((h & ~low_mask) | g.astype(np.uint64))
        top = key >> np.uint64(bits)
        eq = np.flatnonzero(top[1:] == top[:-1])
        a, b = (key[eq] & low_mask).astype(np.int64), (key[eq + 1] & low_mask).astype(np.int64)
    else:  # very many words in one chunk: sort the full hashes, keep the positions
        order = np.argsort(h)
        eq = np.flatnonzero(h[order[1:]] == h[order[:-1]])
        a, b = g[order[eq]], g[order[eq + 1]]
    ra, rb = wrow[a], wrow[b]
    same = ra == rb
    step = max(1, 1_000_000 // n)
    for lo in range(0, len(eq), step):  # 4. (bounded memory)
        sl = slice(lo, lo + step)
        same[sl] &= _same_words(t, word_starts, word_ends, a[sl], b[sl], n)
    repeats = np.bincount(rb[same], minlength=t.n)
    collided[ra[~same]] = True
    collided[rb[~same]] = True
    return count, repeats, collided


def _same_words(t: _Texts, ws: np.ndarray, we: np.ndarray, a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """For word positions a[i], b[i]: are the n words from each equal in lower case?"""
    wa = (a[:, None] + np.arange(n)).ravel()
    wb = (b[:, None] + np.arange(n)).ravel()
    la, lb = we[wa] - ws[wa], we[wb] - ws[wb]
    ok = la == lb
    lens = np.where(ok, la, 0)
    k = concat_ranges(0, lens)
    pa_ = np.repeat(ws[wa], lens) + k
    pb_ = np.repeat(ws[wb], lens) + k
    bad = np.repeat(np.arange(len(wa)), lens)[t.low[pa_] != t.low[pb_]]
    ok[bad] = False
    return ok.reshape(len(a), n).all(axis=1)


def _conversation_texts(messages: pa.Array) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]:
    """(prompt text, response text, assistant messages, any message with tool calls) per row, as
    :func:`curate.records.prompt_text` / :func:`~curate.records.response_text` make them."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks() if messages.num_chunks != 1 else messages.chunk(0)
    n = len(messages)
    flat = pc.list_flatten(messages)
    parent = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False)
    role = pc.fill_null(pc.struct_field(flat, "role"), "")
    content = pc.struct_field(flat, "content")
    calls = pc.struct_field(flat, "tool_calls")
    is_assistant = pc.equal(role, "assistant").to_numpy(zero_copy_only=False)
    has_content = pc.fill_null(pc.greater(pc.utf8_length(content), 0), False).to_numpy(zero_copy_only=False)
    has_calls = pc.fill_null(pc.greater(pc.utf8_length(calls), 0), False).to_numpy(zero_copy_only=False)

    def joined(keep: np.ndarray) -> pa.Array:
        idx = np.flatnonzero(keep)
        offsets = np.concatenate(([0], np.cumsum(np.bincount(parent[idx], minlength=n)))).astype(np.int32)
        lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), content.take(pa.array(idx, pa.int64())))
        return pc.binary_join(lists, "\n\n")

    turns = np.bincount(parent[is_assistant], minlength=n)
    tools = np.bincount(parent[has_calls], minlength=n) > 0
    return joined(~is_assistant & has_content), joined(is_assistant & has_content), turns, tools


def _components_json(ngrams: np.ndarray, reason_bits: np.ndarray) -> pa.Array:
    """``json.dumps({"reasons": …, "ngrams": …}, ensure_ascii=False, sort_keys=True)`` per row."""
    tails = []
    for bits in range(1 << len(REASONS)):
        reasons = [r for i, r in enumerate(REASONS) if bits >> i & 1]
        tails.append(", \"reasons\": " + json.dumps(reasons, ensure_ascii=False) + "}")
    tail = pa.array(tails, pa.string()).take(pa.array(reason_bits, pa.int64()))
    head = pa.array(["{\"ngrams\": "] * 1, pa.string()).take(pa.array(np.zeros(len(ngrams), np.int64)))
    return pc.binary_join_element_wise(head, pc.cast(pa.array(ngrams, pa.int64()), pa.string()), tail, "")


class HeuristicScorer(Scorer):
    method = "heuristic"
    version = "1.0"
    outputs = {
        "prompt_chars": "higher_is_better",
        "response_chars": "higher_is_better",
        "prompt_tokens": "higher_is_better",
        "response_tokens": "higher_is_better",
        "turns": "higher_is_better",
        "repetition": "lower_is_better",
        "degenerate": "flag",
    }
    batch_rows = 2048
    table_rows = 4096
    collapse_check = False  # counts and flags are naturally concentrated (most rows have one turn)

    class Params(Scorer.Params):
        tokenizer: str = Field("regex", description="'regex' or an HF tokenizer id / local dir.")
        max_repetition: float = Field(0.5, ge=0, le=1)
        ngram: int = Field(10, ge=1, description="Word n-gram size for the repetition ratio.")
        min_ngrams: int = Field(10, ge=1, description="Repetition is judged only with at least this many n-grams.")
        max_char_share: float = Field(0.5, gt=0, le=1)
        min_chars_for_share: int = Field(20, ge=1)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tok = None

    def _count_tokens(self, texts: list[str]) -> list[int]:
        if self.params.tokenizer == "regex":
            return [len(TOKEN.findall(t)) for t in texts]
        if self._tok is None:
            from curate.models import load_tokenizer

            self._tok = load_tokenizer(self.params.tokenizer)
        enc = self._tok(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in enc]

    def score_batch(self, records: list[dict[str, Any]]) -> list[Score]:
        from curate.records import MESSAGE_TYPE

        table = pa.table({"messages": pa.array([r["messages"] for r in records], pa.list_(MESSAGE_TYPE))})
        return self.score_table(table).to_scores(self.outputs)

    def score_table(self, table: pa.Table) -> ScoreColumns:
        """Every output for the rows of ``table`` (its ``messages`` column), without per-row Python objects."""
        p = self.params
        prompt_s, resp_s, turns, tools = _conversation_texts(table.column("messages"))
        prompt, resp = _Texts(prompt_s), _Texts(resp_s)
        n = resp.n
        rws, rwe, rnw = _words(resp)
        if p.tokenizer == "regex":
            ptok, rtok = _regex_tokens(prompt, _words(prompt)[2]), _regex_tokens(resp, rnw)
        else:  # an HF tokenizer: batched over this chunk's strings
            ptok = np.array(self._count_tokens(prompt_s.to_pylist()), dtype=np.int64).reshape(n)
            rtok = np.array(self._count_tokens(resp_s.to_pylist()), dtype=np.int64).reshape(n)
        count, repeats, collided = _ngram_repeats(resp, rws, rwe, rnw, p.ngram)
        rep = repeats / np.maximum(count, 1)  # 0.0 where there is no n-gram
        bits = np.zeros(n, dtype=np.int64)
        bits |= ((resp.per_row(resp.has(C_ALNUM)) == 0) & ~tools).astype(np.int64) << 0
        bits |= _copies_prompt(resp, prompt).astype(np.int64) << 1
        bits |= ((count >= p.min_ngrams) & (rep > p.max_repetition)).astype(np.int64) << 2
        bits |= _char_share_exceeds(resp, p.min_chars_for_share, p.max_char_share).astype(np.int64) << 3
        values = {
            "prompt_chars": prompt.lengths.astype(np.float64),
            "response_chars": resp.lengths.astype(np.float64),
            "prompt_tokens": ptok.astype(np.float64),
            "response_tokens": rtok.astype(np.float64),
            "turns": turns.astype(np.float64),
            "repetition": rep.astype(np.float64),
            "degenerate": (bits > 0).astype(np.float64),
        }
        used = (ptok + rtok).astype(np.int64)
        components = _components_json(count, bits)
        # rows the tables cannot do exactly (see the module docstring): the reference, row by row
        special = resp.special | prompt.special
        redo = np.flatnonzero(collided | special)
        if len(redo):
            rows = table.column("messages").take(pa.array(redo, pa.int64())).to_pylist()
            comp = components.to_pylist()
            for i, msgs in zip(redo, rows):
                vals, c, u = _reference_row(msgs, p, int(ptok[i]), int(rtok[i]))
                for k, v in vals.items():
                    values[k][i] = v
                used[i] = u
                comp[i] = json.dumps(c, ensure_ascii=False, sort_keys=True, default=float)
            components = pa.array(comp, pa.string())
        return ScoreColumns(values=values, components=components, n_tokens_in=used, n_tokens_used=used)

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp["tokenizer_id"] = self.params.tokenizer
        return fp
