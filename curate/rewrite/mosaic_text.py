"""The wording Mosaic-IT draws from: number tags, response delimiters, meta-instructions, layouts.

Every list here was written for curate (the reference implementation has no licence, so none of its
strings are used; methods.md C3 describes only what kind of list each one is). The id, the version
and the sha256 of every list (:func:`text_ref`) enter the rewriter's fingerprint: changing a word
changes the key of every derived row.

Placeholders are filled with :func:`fill` (plain replacement, so braces in the text need no
escaping): ``{i}`` a 1-based number, ``{x}`` a delimiter word, ``{begin}``/``{end}`` the two
delimiters, ``{seq}`` a styled list of numbers, ``{k}`` a count and ``{s}`` its plural suffix.
Meta-instructions are written to read correctly before or after the block of instructions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re

TEXT_ID = "mosaic_it_text"
TEXT_VERSION = "1"

# -- number tags: "(3): " prefixes instruction 3 and its response --------------------------------
#: Index 0 is the bare number and means *no numbering* (the tag is empty).
NUMBER_STYLES: tuple[str, ...] = (
    "{i}", "({i})", "[{i}]", "{i})", "#{i}", "<{i}>", "**{i}**", "Task {i}", "Item {i}", "Part {i}",
)
#: Between the number and the text; followed by a space, or by a newline when the draw says so.
NUMBER_SEPARATORS: tuple[str, ...] = (":", ".", " -")

# -- response delimiters: each response is written as <begin><response><end> ----------------------
DELIMITER_WORDS: tuple[tuple[str, str], ...] = (
    ("BEGIN", "END"), ("START", "FINISH"), ("OPEN", "CLOSE"), ("ANSWER", "END OF ANSWER"),
    ("REPLY", "END REPLY"), ("OUTPUT", "/OUTPUT"), ("RESPONSE", "/RESPONSE"), ("SOLUTION", "END SOLUTION"),
    ("HEAD", "TAIL"), ("FROM HERE", "TO HERE"), ("ON", "OFF"), ("IN", "OUT"), ("ALPHA", "OMEGA"),
    ("ENTER", "EXIT"), ("GO", "STOP"), ("INIT", "DONE"),
)
DELIMITER_BRACKETS: tuple[str, ...] = (
    "({x})", "[{x}]", "<{x}>", "{{x}}", "<<{x}>>", "[[{x}]]", "**{x}**", "__{x}__", "=={x}==",
    "--{x}--", "~~{x}~~", "#{x}#", "%{x}%", "^{x}^", "`{x}`", "::{x}::", "<!{x}!>", ">>{x}<<",
    "+{x}+", "/{x}/",
)

# -- format meta-instructions -------------------------------------------------------------------
#: With delimiters on.
FORMAT_WRAP_META: tuple[str, ...] = (
    "Put each of your answers between {begin} and {end}.",
    "Every answer must open with {begin} and close with {end}.",
    "Enclose each response in the markers {begin} and {end}.",
    "Mark the start of each answer with {begin} and its end with {end}.",
    "Surround every reply with {begin} at the front and {end} at the back.",
    "Write {begin} right before each answer and {end} right after it.",
    "Each reply goes inside its own {begin} ... {end} pair.",
    "Use {begin} to open and {end} to close every one of your answers.",
    "Frame each answer: first {begin}, then the answer itself, then {end}.",
    "Bracket your responses with {begin} and {end}, one pair per response.",
    "Delimit each answer by starting it with {begin} and ending it with {end}.",
    "When you answer, fence every response with {begin} before and {end} after.",
)
#: With delimiters off (half of those draws use no meta-instruction at all).
FORMAT_PLAIN_META: tuple[str, ...] = (
    "Answer each of these tasks.",
    "Several tasks are given here; complete all of them.",
    "Handle every request in this list.",
    "Please work through each of these instructions.",
    "Reply to every one of these tasks.",
    "Give a response for each instruction in this list.",
)

# -- layout -------------------------------------------------------------------------------------
#: Between consecutive instructions.
INSTRUCTION_JOINERS: tuple[str, ...] = ("\n", "\n\n")
#: Between consecutive responses.
RESPONSE_JOINER = "\n\n"
#: Where a meta-instruction goes relative to its block: (meta first?, separator).
LAYOUTS: tuple[tuple[bool, str], ...] = ((True, "\n"), (True, "\n\n"), (False, "\n"), (False, "\n\n"))

# -- permute: responses in another order than the instructions ----------------------------------
PERMUTE_META: dict[str, tuple[str, ...]] = {
    "FIX": (
        "Give your answers in this order: {seq}.",
        "Respond to the tasks in the sequence {seq}.",
        "Answer them following the order {seq}.",
        "Use this order for your answers: {seq}.",
        "Arrange your responses as {seq}.",
    ),
    "REVERSE": (
        "Answer the tasks from the last one to the first one.",
        "Respond in reverse order, beginning with the final task.",
        "Start with the last instruction and work back to the first.",
        "Give the answers in the opposite order to the tasks.",
    ),
    "ALPHA": (
        "Answer the tasks in alphabetical order of their text.",
        "Sort the instructions alphabetically by their wording and answer them in that order.",
        "Respond in A-to-Z order of the instructions.",
        "Order your answers alphabetically by the instruction each one answers.",
    ),
    "REVERSE_ALPHA": (
        "Answer the tasks in reverse alphabetical order of their text.",
        "Respond in Z-to-A order of the instructions.",
        "Sort the instructions by their wording from Z to A and answer them in that order.",
        "Order your answers reverse-alphabetically by the instruction each one answers.",
    ),
    "LENGTH_WORD": (
        "Answer the instruction with the fewest words first and the one with the most words last.",
        "Order your answers by the word count of each instruction, shortest first.",
        "Respond to the instructions from the shortest to the longest, counting words.",
        "Begin with the task that has the fewest words and go up from there.",
    ),
    "REVERSE_LENGTH_WORD": (
        "Answer the instruction with the most words first and the one with the fewest words last.",
        "Order your answers by the word count of each instruction, longest first.",
        "Respond to the instructions from the longest to the shortest, counting words.",
        "Begin with the task that has the most words and go down from there.",
    ),
    "LENGTH_CHAR": (
        "Answer the instruction with the fewest characters first and the one with the most characters last.",
        "Order your answers by the character count of each instruction, shortest first.",
        "Respond to the instructions from the shortest to the longest, counting characters.",
    ),
    "REVERSE_LENGTH_CHAR": (
        "Answer the instruction with the most characters first and the one with the fewest characters last.",
        "Order your answers by the character count of each instruction, longest first.",
        "Respond to the instructions from the longest to the shortest, counting characters.",
    ),
    "ODD_EVEN": (
        "First answer the odd-numbered tasks, then the even-numbered ones.",
        "Respond to tasks 1, 3, 5, ... before tasks 2, 4, 6, ...",
        "Handle the tasks with odd numbers before those with even numbers.",
    ),
    "EVEN_ODD": (
        "First answer the even-numbered tasks, then the odd-numbered ones.",
        "Respond to tasks 2, 4, 6, ... before tasks 1, 3, 5, ...",
        "Handle the tasks with even numbers before those with odd numbers.",
    ),
}
#: ``match_reference=True``: the reference describes its (whole-text) sort as one by first letter.
PERMUTE_META_FIRST_LETTER: dict[str, tuple[str, ...]] = {
    "ALPHA": (
        "Answer the tasks in alphabetical order of their first letter.",
        "Start with the task whose first letter comes earliest in the alphabet.",
        "Order your answers by the first letter of each instruction, from A to Z.",
    ),
    "REVERSE_ALPHA": (
        "Answer the tasks in reverse alphabetical order of their first letter.",
        "Start with the task whose first letter comes latest in the alphabet.",
        "Order your answers by the first letter of each instruction, from Z to A.",
    ),
}

# -- maskout: some instructions are to be ignored -----------------------------------------------
MASKOUT_META: dict[str, tuple[str, ...]] = {
    "FIX": (
        "Skip the tasks numbered {seq} and answer the rest.",
        "Do not answer tasks {seq}.",
        "Ignore instructions {seq}; respond to all the others.",
        "Leave tasks {seq} unanswered.",
    ),
    "WORD_LONG": (
        "Ignore the {k} longest instruction{s} by word count and answer the others.",
        "Do not respond to the {k} task{s} with the most words.",
        "Skip the {k} wordiest instruction{s}; answer everything else.",
    ),
    "WORD_SHORT": (
        "Ignore the {k} shortest instruction{s} by word count and answer the others.",
        "Do not respond to the {k} task{s} with the fewest words.",
        "Skip the {k} briefest instruction{s}; answer everything else.",
    ),
    "ODD": (
        "Answer only the even-numbered tasks and skip the odd-numbered ones.",
        "Ignore every task with an odd number.",
        "Leave tasks 1, 3, 5, ... unanswered.",
    ),
    "EVEN": (
        "Answer only the odd-numbered tasks and skip the even-numbered ones.",
        "Ignore every task with an even number.",
        "Leave tasks 2, 4, 6, ... unanswered.",
    ),
}
#: Fraction of the instructions a FIX / WORD_LONG / WORD_SHORT maskout hides: uniform in this range.
MASK_RATIO_RANGE = (0.1, 0.5)

# -- styled number sequences ({seq}) for FIX ----------------------------------------------------
SEQUENCE_WRAPS: tuple[str, ...] = ("{seq}", "[{seq}]", "({seq})", "<{seq}>", "{{seq}}", "|{seq}|")
PERMUTE_SEQUENCE_SEPARATORS: tuple[str, ...] = (", ", " ", "; ", " -> ", " => ", " then ")
MASKOUT_SEQUENCE_SEPARATORS: tuple[str, ...] = (", ", "; ", " and ", " / ")


def fill(template: str, **values: object) -> str:
    """Replace each ``{name}`` by its value, in one pass (values are not scanned again)."""
    return "".join(fill_pieces(template, **values))


def fill_pieces(template: str, **values: object) -> list[str]:
    """``fill`` as pieces: the template's text between the placeholders, and each value, in order."""
    parts = _split(template, tuple(values))  # text, name, text, name, ..., text
    return [str(values[x]) if k % 2 else x for k, x in enumerate(parts)]


@functools.lru_cache(maxsize=1024)
def _split(template: str, names: tuple[str, ...]) -> list[str]:
    if not names:
        return [template]
    return re.split("\\{(" + "|".join(map(re.escape, names)) + ")\\}", template)


def _lists() -> dict[str, object]:
    return {name: value for name, value in globals().items()
            if name.isupper() and name not in ("TEXT_ID", "TEXT_VERSION")}


def text_ref() -> dict[str, str]:
    """What enters a fingerprint: id, version and the sha256 of every list above."""
    payload = json.dumps(_lists(), sort_keys=True, ensure_ascii=False)
    return {"id": TEXT_ID, "version": TEXT_VERSION, "hash": hashlib.sha256(payload.encode()).hexdigest()}
