"""Every prompt curate sends to a model, in one place, each with an id and a version.

The id, the version and the sha256 of the exact text enter the fingerprint of every score that uses
the prompt, so changing a word re-scores instead of silently mixing old and new numbers.

Two kinds live here:

- **our prompts** — written for curate (the r-IFD reverse prompt, judge rubrics, …);
- **trained formats** — strings that published models were fine-tuned on, where a model only behaves
  as documented when it sees them byte for byte. These are reproduced with attribution: the Stanford
  Alpaca prompt (tatsu-lab/stanford_alpaca, Apache-2.0 code) and the Vicuna v1.1 system sentence
  (lm-sys/FastChat, Apache-2.0).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    id: str
    version: str
    text: str
    source: str = "curate"

    @property
    def hash(self) -> str:
        return hashlib.sha256(f"{self.id}\x00{self.version}\x00{self.text}".encode()).hexdigest()

    def ref(self) -> dict[str, str]:
        """What enters a score fingerprint."""
        return {"id": self.id, "version": self.version, "hash": self.hash}


# -- trained formats (reproduced exactly; see module docstring) ----------------------------------

ALPACA_NO_INPUT = Prompt(
    "alpaca_no_input", "1",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    source="tatsu-lab/stanford_alpaca (Apache-2.0), trained format",
)
ALPACA_WITH_INPUT = Prompt(
    "alpaca_with_input", "1",
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    source="tatsu-lab/stanford_alpaca (Apache-2.0), trained format",
)
VICUNA_SYSTEM = Prompt(
    "vicuna_v1.1_system", "1",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    source="lm-sys/FastChat (Apache-2.0), trained format",
)

# -- our prompts ----------------------------------------------------------------------------------

RIFD_REVERSE = Prompt(
    "rifd_reverse", "1",
    "The text below is an assistant's reply; work out which user instruction it was written for.\n"
    "{response}\n"
    "Now state that instruction, and nothing else.",
)

ALL = {p.id: p for p in (ALPACA_NO_INPUT, ALPACA_WITH_INPUT, VICUNA_SYSTEM, RIFD_REVERSE)}


# -- deita (A6) ----------------------------------------------------------------------------------
# The released deita scorers were fine-tuned on these exact strings (hkust-nlp/deita,
# src/deita/selection/scorer/llama_scorer.py, Apache-2.0): a trained format, reproduced byte for byte.
DEITA_COMPLEXITY = Prompt(
    "deita_complexity_trained", "1",
    "You are a helpful assistant. Please identify the complexity score of the following user query. \n##Query: {instruction}  \n##Complexity: ",
    source="hkust-nlp/deita llama_scorer.py (Apache-2.0), trained format",
)
DEITA_QUALITY = Prompt(
    "deita_quality_trained", "1",
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the Question. \n"
    " #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: ",
    source="hkust-nlp/deita llama_scorer.py (Apache-2.0), trained format",
)
# Ours, for any chat model (the user message; the reply is the digit).
DEITA_COMPLEXITY_CHAT = Prompt(
    "deita_complexity_chat", "1",
    "How complex is the request below? Rate it from 1 (trivial: one obvious step) to 6 (very complex: many "
    "constraints, deep expertise, several steps). Reply with one digit only.\n\nRequest:\n{instruction}",
)
DEITA_QUALITY_CHAT = Prompt(
    "deita_quality_chat", "1",
    "Judge the answer below. Rate its quality from 1 (wrong, unhelpful or off-topic) to 6 (correct, complete, "
    "clear and helpful). Reply with one digit only.\n\nQuestion:\n{instruction}\n\nAnswer:\n{output}",
)

# -- SelectIT (A4): our nine rating lines (the reference ships its own; these are written anew) -----
SELECTIT_LINES = tuple(
    Prompt(f"selectit_rating_{i + 1}", "1", text)
    for i, text in enumerate((
        "On a scale from 1 to 5, how accurately does the response follow the instruction? Give only the number.",
        "Rate from 1 to 5 how well the response carries out the instruction. Output the score alone.",
        "How faithfully does this response complete the instruction? Score it 1 to 5 and write only the score.",
        "Give a score between 1 and 5 for how precisely the response answers the instruction; reply with the digit only.",
        "Assess how closely the response matches what the instruction asks for, from 1 (not at all) to 5 (fully). Only the score.",
        "Score the response from 1 to 5 for how correctly it fulfils the instruction. Write nothing but the score.",
        "To what degree does the response do what the instruction requests? Answer with a number from 1 to 5.",
        "Evaluate the response's adherence to the instruction on a 1-5 scale and output just that number.",
        "How well is the instruction followed by the response? Rate 1 to 5; respond with a single digit.",
    ))
)
SELECTIT_LAYOUT = Prompt("selectit_layout", "1", "{rating}\n\nInstruction:{instruction}\nResponse:{response}\nThe answer is: \n")

# -- LLM rating (A7): rubrics -------------------------------------------------------------------
RUBRIC_ACCURACY_0_5 = Prompt(
    "rubric_accuracy_0_5", "1",
    "You review answers written by an AI assistant. Read the instruction (and its input, if any) and the "
    "assistant's response, then rate how accurate and helpful the response is on a scale from 0 to 5, where 0 "
    "is useless or wrong and 5 is fully correct and helpful. Write the score alone on the first line, then "
    "one or two sentences explaining it.",
)
RUBRIC_QUALITY_1_10_JSON = Prompt(
    "rubric_quality_1_10_json", "1",
    "You review answers written by an AI assistant. Rate the assistant's last response for correctness, "
    "helpfulness and clarity on a scale from 1 to 10. Reply with a JSON object only, like {\"score\": 7, "
    "\"reason\": \"...\"}.",
)
RUBRICS = {p.id: p for p in (RUBRIC_ACCURACY_0_5, RUBRIC_QUALITY_1_10_JSON)}

# -- DS2 rating (A5): ours ------------------------------------------------------------------------
DS2_SYSTEM = Prompt(
    "ds2_system", "1",
    "You estimate the value of instruction-tuning data. For the conversation you are shown, rate from 1 to 10: "
    "Rarity (how unusual the topic or task is in typical instruction data), Complexity (how much reasoning or "
    "expertise it takes), Informativeness (how much a model would learn from the answer), and an Overall rating "
    "of its worth as training data. Use the whole scale: spread your ratings rather than giving most samples the "
    "same number.",
)
DS2_USER = Prompt(
    "ds2_user", "2",
    "Data sample (conversation):\n{conversation}\n"
    "Return only a JSON object with integer values from 1 to 10 for the keys \"Rarity\", \"Complexity\", "
    "\"Informativeness\" and \"Overall rating\", in this form, where each n is your rating: "
    "{{\"Rarity\": n, \"Complexity\": n, \"Informativeness\": n, \"Overall rating\": n}}",
)

ALL.update({p.id: p for p in (DEITA_COMPLEXITY, DEITA_QUALITY, DEITA_COMPLEXITY_CHAT, DEITA_QUALITY_CHAT, SELECTIT_LAYOUT,
                              RUBRIC_ACCURACY_0_5, RUBRIC_QUALITY_1_10_JSON, DS2_SYSTEM, DS2_USER, *SELECTIT_LINES)})

# -- DELIFT (B5): ours; the wrapper layout (three newlines, "Example:", "Query:") follows the paper --
DELIFT_NO_ICL = Prompt("delift_no_icl", "1", "Instruction: Write a response to the query below.\n\n\nQuery: {query}\n")
DELIFT_ICL = Prompt(
    "delift_icl", "1",
    "Instruction:\nUse the example as a guide, and answer the query in the same format and style, clearly and concisely.\n\n\n"
    "Example:\n{example_query}\n{example_response}\n\n\nQuery:\n{query}\n",
)
ALL.update({p.id: p for p in (DELIFT_NO_ICL, DELIFT_ICL)})

# -- Reflection-Tuning (C1) and Selective Reflection-Tuning (C2): ours -----------------------------
# (prompts of curate/rewrite/reflection.py go here)

# -- AIDE (C4): ours --------------------------------------------------------------------------------
# (prompts of curate/rewrite/aide.py go here)
