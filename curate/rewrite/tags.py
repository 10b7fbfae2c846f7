"""Tag parsers of the LLM rewriters: the replies of a teacher model hold their fields inside tags.

Two syntaxes, each the one its prompts ask for:

- **XML-style** ``<Tag>…</Tag>`` (AIDE, :mod:`curate.rewrite.aide`): :func:`parse_tag` gives the
  content of the last ``<Tag>…</Tag>`` (stripped), else of the last lowercase ``<tag>…</tag>``; the
  field parsers build on it — :func:`parse_attributes` (``<Topic>`` and ``<Related knowledge>a, b,
  c</Related knowledge>``), :func:`parse_triples` (knowledge-graph lines ``[a, rel, b]``),
  :func:`parse_choices` (``Correct:`` / ``Incorrect:`` lines), :func:`parse_grade` (``<Score>``),
  :func:`parse_yes_no` and :func:`yes_no`.
- **bracket** ``[Tag]`` … ``[End]`` (Reflection-Tuning and Selective Reflection-Tuning,
  :mod:`curate.rewrite.reflection`): :func:`parse_tagged` / :func:`parse_field` for the fields of
  :data:`TAGS`.

**Bracket parsing** (:func:`parse_tagged`): a tag's segment runs from the tag to ``[End]``, the next known
tag, or the end of the text — never to a bare word "End". Tags match case-insensitively, with
optional spaces inside the brackets. A segment not closed by ``[End]`` loses a list number left
alone on its last line ("…\\n\\n3." before ``[New Answer]``, as the reference strips it). A field is
``missing`` (no tag), ``empty``, ``placeholder`` (the whole text is a filler, e.g. "your answer",
"N/A", "[Your Answer]"; not a real answer such as "None." or "Write an analysis.") or ``ambiguous``
(two different non-empty segments for one tag); repeated segments that differ only in case or
spacing count once. With ``match_reference: true`` the reference's rules apply instead: a field's
value is its first segment (a better answer needs exactly one); its placeholder tests are
substrings, case-sensitive, per field ("your instruction" in Q′; "N/A" or "your answer" in A′; none
for A*). A reply cut off by its token limit (``truncated``) gives no value from a segment that runs
to the end of the text. What a field that does not parse leads to (a retry, a fallback, a dropped
row) is the rewriter's own rule (:func:`curate.rewrite.reflection.wants_retry`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# -- XML-style tags (AIDE) ------------------------------------------------------------------------

def parse_tag(text: str | None, tag: str) -> tuple[str | None, str]:
    """The content of the last ``<tag>…</tag>`` in ``text`` (stripped), else of the last
    ``<tag-lowercased>…</…>``. Status: ``ok``, ``ok_lowercase``, ``empty`` (a tag with nothing in it)
    or ``missing_tag``."""
    if text is None:
        return None, "missing_tag"
    for t, status in ((tag, "ok"), (tag.lower(), "ok_lowercase")):
        found = re.findall(f"<{re.escape(t)}>(.*?)</{re.escape(t)}>", text, re.S)
        if found:
            value = found[-1].strip()
            return (value, status) if value else (None, "empty")
    return None, "missing_tag"


def parse_attributes(text: str | None, cap: int) -> tuple[str | None, list[str], str]:
    """(topic, attributes, status) from an analysis reply; attributes split on commas, stripped,
    de-duplicated case-insensitively, at most ``cap``. Status: the worse of the two tags' statuses."""
    topic, st_topic = parse_tag(text, "Topic")
    body, st_attr = parse_tag(text, "Related knowledge")
    attrs: list[str] = []
    seen: set[str] = set()
    for a in (body or "").split(","):
        a = a.strip()
        if a and a.lower() not in seen:
            seen.add(a.lower())
            attrs.append(a)
    if topic is None:
        return None, attrs[:cap], f"topic_{st_topic}"
    if body is None:
        return topic, [], f"attributes_{st_attr}"
    return topic, attrs[:cap], "ok" if st_topic == st_attr == "ok" else "ok_lowercase"


def parse_triples(text: str | None, known: list[str], n: int) -> list[str]:
    """New concepts from KG-expansion lines ``[a, rel, b]``: the last quoted item of each bracketed
    line, skipping ones already known (case-insensitive), at most ``n``."""
    seen = {k.lower() for k in known}
    out: list[str] = []
    for line in (text or "").splitlines():
        m = re.search(r"\[(.*)\]", line)
        if not m:
            continue
        quoted = re.findall(r"[\"']([^\"']+)[\"']", m.group(1))
        if not quoted:
            continue
        c = quoted[-1].strip()
        if c and c.lower() not in seen:
            seen.add(c.lower())
            out.append(c)
        if len(out) >= n:
            break
    return out


_OPTION = re.compile(r"^\s*(?:[-*•]\s*)?(?:\(?[A-Ja-j1-9][).:]\s+)?(correct|incorrect)\s*[:.)\-–]\s*(.+?)\s*$", re.I)
_LABEL = re.compile(r"^\s*\(?[A-Ja-j][).]\s+")


def parse_choices(body: str) -> list[tuple[str, int]]:
    """``Correct: x`` / ``Incorrect: y`` lines (optionally bulleted or lettered) → [(option, 1|0)];
    a leading option label inside the text (``B) …``) is removed."""
    out = []
    for line in body.splitlines():
        m = _OPTION.match(line)
        if m:
            text = _LABEL.sub("", m.group(2)).strip()
            if text:
                out.append((text, 1 if m.group(1).lower() == "correct" else 0))
    return out


def parse_grade(text: str | None) -> tuple[int | None, str]:
    """The first integer in the last ``<Score>`` tag, if it is in 1..10. Status ``ok`` or why not."""
    body, status = parse_tag(text, "Score")
    if body is None:
        return None, f"grade_{status}"
    m = re.search(r"\d+", body)
    if not m:
        return None, "grade_not_a_number"
    g = int(m.group())
    return (g, "ok") if 1 <= g <= 10 else (None, "grade_out_of_range")


def yes_no(body: str) -> bool | None:
    """True for a body whose first word is yes, False for no (any case, leading punctuation skipped), else None."""
    word = re.match(r"\W*(\w+)", body)
    w = word.group(1).lower() if word else ""
    return True if w == "yes" else False if w == "no" else None


def parse_yes_no(text: str | None, tag: str) -> tuple[bool | None, str]:
    """Yes/No from the last ``<tag>`` (lowercase fallback) by its first word. Status ``ok`` (either
    tag form), ``missing_tag``, ``empty`` or ``not_yes_no``."""
    body, status = parse_tag(text, tag)
    if body is None:
        return None, status
    yn = yes_no(body)
    return (None, "not_yes_no") if yn is None else (yn, "ok")



# -- bracket tags [Tag] … [End] (Reflection) ------------------------------------------------------


#: output tags: field name -> the words inside the brackets
TAGS: dict[str, str] = {
    "new_instruction": "New Instruction",
    "new_answer": "New Answer",
    "better_answer": "Better Answer",
    "merged_instruction": "Merged Instruction",
}
END = "End"
_TAG_RE = re.compile(r"\[\s*(" + "|".join(r"\s+".join(w.split()) for w in [*TAGS.values(), END]) + r")\s*\]", re.IGNORECASE)
_NAME_OF = {" ".join(w.lower().split()): k for k, w in TAGS.items()}

#: whole-text placeholders (compared after :func:`_normalise_placeholder`); words that can be a real
#: answer ("None.", "null", "Na" for sodium) are not among them
_PLACEHOLDER_WORDS = {"", "n/a", "tbd", "todo", "...", "…", "-", "xxx", "placeholder"}
_NOUN = (r"(?:new|better|improved|merged|rewritten|revised)?\s*(?:instruction|answer|response|question|text|analysis)"
         r"(?:\s+to\s+the\s+(?:new\s+)?instruction)?")
_PLACEHOLDER_RE = re.compile(
    # a filler noun phrase on its own: "answer", "the new instruction", "your better answer here"
    r"^(?:your|the|a|an|my)?\s*" + _NOUN + r"(?:\s+(?:here|goes here|text))?$"
    # a slot-filling verb: "insert the new instruction", "enter your answer here"
    r"|^(?:insert|put|enter)\s+(?:your|the|a|an|my)?\s*" + _NOUN + r"(?:\s+(?:here|goes here|text))?$"
    # "write"/"add" only when they point at the reader's slot: "write your answer", "write the answer here"
    # ("Write an analysis." is an instruction, not a filler)
    r"|^(?:write|add)\s+(?:(?:your|my)\s+" + _NOUN + r"(?:\s+(?:here|goes here|text))?"
    r"|(?:the|a|an)?\s*" + _NOUN + r"\s+(?:here|goes here))$")
#: the reference's substring tests per field (match_reference; case-sensitive, as there): the new
#: instruction falls back on "your instruction", the new answer on "N/A" or "your answer"; the better
#: answer has none (only an empty one falls back)
_REFERENCE_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "new_instruction": ("your instruction",),
    "new_answer": ("N/A", "your answer"),
    "better_answer": (),
}
#: a list number left on its own last line, e.g. "\n\n3." before "[New Answer]" when "[End]" is missing
_TRAILING_NUMBER_RE = re.compile(r"\n[ \t]*(?:\*\*)?\d{1,2}[.)](?:\*\*)?$")


def _normalise_placeholder(text: str) -> str:
    t = text.strip().lower()
    t = t.strip(" \t\r\n*_`\"'()[]{}<>:.")
    return " ".join(t.split())


def is_placeholder(text: str, match_reference: bool = False, name: str | None = None) -> bool:
    """A text that stands for content without being any (our test: the whole text, once stripped of
    brackets, quotes and markup, is a filler word or "your/the new … instruction/answer (here)").
    ``match_reference`` and ``name`` one of the reference's fields (``new_instruction``,
    ``new_answer``, ``better_answer``): the reference's test for that field — the text contains one
    of its strings, case-sensitively (:data:`_REFERENCE_PLACEHOLDERS`)."""
    if match_reference and name in _REFERENCE_PLACEHOLDERS:
        return any(p in text for p in _REFERENCE_PLACEHOLDERS[name])
    t = _normalise_placeholder(text)
    return t in _PLACEHOLDER_WORDS or bool(_PLACEHOLDER_RE.match(t))


def _clean(segment: str) -> str:
    """A segment without the markup that hugs its tags: ``**[Tag]**: text **[End]**`` gives ``text``."""
    s = segment
    if s.startswith("**"):
        s = s[2:]
    s = re.sub(r"^[ \t]*:", "", s)
    s = s.strip()
    if s.endswith("**") and s.count("**") % 2 == 1:
        s = s[:-2].rstrip()
    return s


@dataclass(frozen=True)
class Segment:
    """One tag's segment: its cleaned text and what ended it — ``end`` (``[End]``), ``tag`` (the next
    known tag) or ``eof`` (the end of the text)."""

    text: str
    stop: str


def tag_segments(text: str, name: str) -> list[Segment]:
    """Every segment of tag ``name`` (a key of :data:`TAGS`) in ``text``: from the tag to ``[End]``,
    the next known tag, or the end of the text; cleaned and stripped, in order. A segment not closed
    by ``[End]`` loses a list number left alone on its last line ("…\\n\\n3." before the next tag)."""
    marks = [(m.start(), m.end(), " ".join(m.group(1).lower().split())) for m in _TAG_RE.finditer(text)]
    out = []
    for i, (_, end, word) in enumerate(marks):
        if _NAME_OF.get(word) != name:
            continue
        if i + 1 < len(marks):
            stop, how = marks[i + 1][0], "end" if marks[i + 1][2] == END.lower() else "tag"
        else:
            stop, how = len(text), "eof"
        seg = _clean(text[end:stop])
        if how != "end":
            seg = _TRAILING_NUMBER_RE.sub("", seg).rstrip()
        out.append(Segment(seg, how))
    return out


def segments(text: str, name: str) -> list[str]:
    """The texts of :func:`tag_segments`."""
    return [g.text for g in tag_segments(text, name)]


@dataclass
class FieldParse:
    # ok | missing | empty | placeholder | ambiguous | unchanged (a "new" instruction equal to the old one)
    # | truncated (the reply was cut off by max_tokens inside this field)
    status: str
    value: str | None = None
    n_segments: int = 0

    def record(self) -> dict[str, Any]:
        return {"status": self.status, "n_segments": self.n_segments}


def _fold(text: str) -> str:
    return " ".join(text.casefold().split())


def parse_field(text: str, name: str, match_reference: bool = False, truncated: bool = False) -> FieldParse:
    """The value of one tag (see module docstring). Ours: its one distinct non-empty, non-placeholder
    segment (repeats that differ only in case or spacing count once). ``match_reference`` (the
    reference's fields): its first segment, and for ``better_answer`` exactly one segment.
    ``truncated``: the reply was cut off by its token limit, so a segment that runs to the end of
    the text is ``truncated``, never a value."""
    segs = tag_segments(text, name)
    if not segs:
        return FieldParse("missing")
    n = len(segs)
    if truncated and segs[-1].stop == "eof" and segs[-1].text:
        return FieldParse("truncated", None, n)
    if match_reference and name in _REFERENCE_PLACEHOLDERS:
        if name == "better_answer" and n != 1:
            return FieldParse("ambiguous", None, n)
        first = segs[0].text
        if not first:
            return FieldParse("empty", None, n)
        return FieldParse("placeholder", None, n) if is_placeholder(first, True, name) else FieldParse("ok", first, n)
    real: dict[str, str] = {}
    for g in segs:
        if g.text and not is_placeholder(g.text, match_reference, name):
            real.setdefault(_fold(g.text), g.text)
    if len(real) == 1:
        return FieldParse("ok", next(iter(real.values())), n)
    if len(real) > 1:
        return FieldParse("ambiguous", None, n)
    return FieldParse("empty" if all(not g.text for g in segs) else "placeholder", None, n)


def same_text(text: str, *others: str | None) -> bool:
    """Equal up to case and whitespace."""
    return any(o is not None and _fold(text) == _fold(o) for o in others)


def parse_tagged(text: str, names: tuple[str, ...], match_reference: bool = False, truncated: bool = False) -> dict[str, FieldParse]:
    """Each field of ``names`` parsed from ``text``."""
    return {n: parse_field(text, n, match_reference, truncated) for n in names}

