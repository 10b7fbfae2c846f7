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

    @property
    def shape(self) -> dict | None:
        """The declared output shape of a reply to this prompt (:data:`SHAPES`, at the end of this
        module), or None. Not part of :attr:`hash`: it enters a reply's key only when a call is
        constrained (``decoding.constrain``)."""
        return SHAPES.get(self.id)


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
    "You are a helpful assistant. Please identify the complexity score of the following user query. "
    "\n##Query: {instruction}  \n##Complexity: ",
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
# Written for curate (the reference repository has no licence): the structure, criteria and output
# tags follow methods.md C1; the wording is our own. Each call is a system persona plus a user turn;
# the parser (curate/rewrite/reflection.py) reads the bracketed output tags.
REFLECT_INSTRUCTION_SYSTEM = Prompt(
    "reflect_instruction_system_v1", "1",
    "You review instruction-tuning data. You are helpful and exact, and you are hard to satisfy: few "
    "instructions pass your inspection unchanged.",
)
_REFLECT_INSTRUCTION_STEPS = (
    "Do three things, in this order.\n"
    "1. Say what keeps the instruction from being a good one. Consider: how complex its topic is, how much "
    "detail it asks for, what knowledge it calls for, how ambiguous it is, and how much logical reasoning or "
    "problem solving it requires. Then say what keeps the answer from being a good one. Consider: "
    "helpfulness, relevance, accuracy and level of detail. Then explain how the weaknesses of the instruction "
    "caused the weaknesses of the answer.\n"
    "2. Write a new instruction that is complete, more complex and harder than the original. Keep it on the "
    "original's subject, but make it understandable to someone who never saw the original{self_contained}. "
    "Write it between [New Instruction] and [End].\n"
    "3. Answer your new instruction as thoroughly and in as much detail as you can. Write the answer between "
    "[New Answer] and [End].\n\n"
    "Reply in this layout:\nAnalysis: your analysis\n[New Instruction] your new instruction [End]\n"
    "[New Answer] your answer to the new instruction [End]"
)
REFLECT_INSTRUCTION = Prompt(
    "reflect_instruction_v1", "1",
    "Here is an instruction that was given to an AI assistant, and the answer it received.\n\n"
    "----- INSTRUCTION -----\n{instruction}\n----- END OF INSTRUCTION -----\n\n"
    "----- ANSWER -----\n{answer}\n----- END OF ANSWER -----\n\n"
    + _REFLECT_INSTRUCTION_STEPS.format(self_contained=""),
)
REFLECT_INSTRUCTION_INPUT = Prompt(
    "reflect_instruction_input_v1", "1",
    "Here is an instruction that was given to an AI assistant together with an input it refers to, and the "
    "answer it received.\n\n"
    "----- INSTRUCTION -----\n{instruction}\n----- END OF INSTRUCTION -----\n\n"
    "----- INPUT -----\n{input}\n----- END OF INPUT -----\n\n"
    "----- ANSWER -----\n{answer}\n----- END OF ANSWER -----\n\n"
    + _REFLECT_INSTRUCTION_STEPS.format(self_contained=" or the input: everything needed must be in the new "
                                        "instruction itself"),
)
REFLECT_RESPONSE_SYSTEM = Prompt(
    "reflect_response_system_v1", "1",
    "You review answers written by AI assistants. You are exact and hard to satisfy: few answers pass your "
    "inspection unchanged.",
)
REFLECT_RESPONSE_INPUT_SYSTEM = Prompt(
    "reflect_response_input_system_v1", "1",
    "You review answers written by AI assistants. You are helpful and exact, and you check that an answer "
    "uses the input it was given.",
)
_REFLECT_RESPONSE_STEPS = (
    "Do two things, in this order.\n"
    "1. Say what keeps the answer from being a good one. Consider: helpfulness, relevance, accuracy and level "
    "of detail.\n"
    "2. Write a better answer to the same instruction: new, complete, and as detailed as you can make it. "
    "Write it between [Better Answer] and [End].\n\n"
    "Reply in this layout:\nAnalysis: your analysis\n[Better Answer] your better answer [End]"
)
REFLECT_RESPONSE = Prompt(
    "reflect_response_v1", "1",
    "Here is an instruction that was given to an AI assistant, and the answer it received.\n\n"
    "----- INSTRUCTION -----\n{instruction}\n----- END OF INSTRUCTION -----\n\n"
    "----- ANSWER -----\n{answer}\n----- END OF ANSWER -----\n\n" + _REFLECT_RESPONSE_STEPS,
)
REFLECT_RESPONSE_INPUT = Prompt(
    "reflect_response_input_v1", "1",
    "Here is an instruction that was given to an AI assistant together with an input it refers to, and the "
    "answer it received.\n\n"
    "----- INSTRUCTION -----\n{instruction}\n----- END OF INSTRUCTION -----\n\n"
    "----- INPUT -----\n{input}\n----- END OF INPUT -----\n\n"
    "----- ANSWER -----\n{answer}\n----- END OF ANSWER -----\n\n" + _REFLECT_RESPONSE_STEPS,
)
REFLECT_COMPRESS_SYSTEM = Prompt(
    "reflect_compress_system_v1", "1",
    "You edit instructions for AI assistants so that each one stands on its own.",
)
REFLECT_COMPRESS = Prompt(
    "reflect_compress_v1", "1",
    "The instruction below comes with a separate input. Merge them into a single instruction that keeps every "
    "piece of information the input provides and needs nothing else to be understood. Do not answer it.\n\n"
    "----- INSTRUCTION -----\n{instruction}\n----- END OF INSTRUCTION -----\n\n"
    "----- INPUT -----\n{input}\n----- END OF INPUT -----\n\n"
    "Write the merged instruction between [Merged Instruction] and [End], in this layout:\n"
    "[Merged Instruction] your merged instruction [End]",
)
REFLECTION_PROMPTS = (REFLECT_INSTRUCTION_SYSTEM, REFLECT_INSTRUCTION, REFLECT_INSTRUCTION_INPUT, REFLECT_RESPONSE_SYSTEM,
                      REFLECT_RESPONSE_INPUT_SYSTEM, REFLECT_RESPONSE, REFLECT_RESPONSE_INPUT, REFLECT_COMPRESS_SYSTEM,
                      REFLECT_COMPRESS)
ALL.update({p.id: p for p in REFLECTION_PROMPTS})

# -- AIDE (C4): ours --------------------------------------------------------------------------------
# Written for curate (the reference, Code4Graph/AIDE, is MIT; only its structure, tags and criteria are
# followed: methods.md C4). Placeholders are filled with str.format by curate/rewrite/aide.py; the
# tags the parser reads are <Topic>, <Related knowledge>, <Rewritten Prompt>, <Created Prompt>,
# <Choices>, <Score>, <Improved Prompt> and <Response>.
AIDE_TOPIC = Prompt(
    "aide_topic", "1",
    "You study instructions the way one reads a small knowledge graph: each fact is a triple "
    "[entity1, relation, entity2], where entity1 is the main subject of the instruction.\n"
    "For the instruction at the end, name its main subject inside <Topic></Topic> and list three short pieces "
    "of knowledge or skill (one or two words each) that solving it needs, separated by commas, inside "
    "<Related knowledge></Related knowledge>. Write nothing else.\n\n"
    "Example\nInstruction: Sort a list of student records by their grade, highest first.\n"
    "<Topic>sorting</Topic>\n<Related knowledge>comparison keys, lists, stability</Related knowledge>\n\n"
    "Example\nInstruction: A train covers 180 km in 2 hours. What is its average speed?\n"
    "<Topic>average speed</Topic>\n<Related knowledge>division, units, rates</Related knowledge>\n\n"
    "Instruction: {instruction}",
)
AIDE_KG_EXPAND = Prompt(
    "aide_kg_expand", "1",
    "Here are facts about \"{topic}\" written as triples [entity1, relation, entity2]:\n{triples}\n"
    "Add {n} new triples whose entity1 is \"{topic}\" and whose entity2 is a concept not listed yet. Write one triple "
    "per line in the form [\"{topic}\", \"relation\", \"concept\"] and nothing else.",
)
AIDE_RESIDUAL = Prompt(
    "aide_residual", "1",
    "- Keep the new instruction close to this original one: {seed}\n",
)
AIDE_ANSWER_FORM_BINARY = Prompt(
    "aide_answer_form_binary", "1",
    "- The new instruction must be a question that is answered with Yes or No.\n",
)
# Version 2: the <Response> is a reply to the new question, part of the training instruction (methods.md C4 2a);
# the Yes/No label comes from the answer call (version 1 asked for the label itself).
AIDE_RESPONSE_FORM = Prompt(
    "aide_response_form", "2",
    "Then, inside <Response></Response>, write a reply of more than two words to the new question, as another person "
    "might say it: either a reply that answers it without a plain yes or no, or a reply about something unrelated.\n",
)
_AIDE_REWRITE_HEAD = (
    "You write instructions for training an assistant in {use_case}. Rewrite the instruction at the end so that it "
    "is a little harder for a strong AI model to answer, while staying reasonable and answerable. Keep any code, "
    "tables or numbers it contains.\n"
    "Requirements:\n"
)
_AIDE_REWRITE_TAIL = (
    "- It must belong to {use_case}, concern the topic \"{topic}\" and exercise the skill \"{skill}\".\n"
    "{residual}{answer_form}"
    "- Make it as short as you can.\n"
    "- Do not mention the words \"given instruction\", \"rewritten instruction\" or any tag names in it.\n"
    "Put only the new instruction inside <Rewritten Prompt></Rewritten Prompt>.\n"
    "{response_form}\n"
    "{examples}"
    "Instruction: {instruction}"
)
# The rewrite prompts are version 2: their tail gained {response_form} (AIDE_RESPONSE_FORM for binary tasks,
# else empty — then the filled text is byte for byte that of version 1).
AIDE_REWRITE_REASONING = Prompt(
    "aide_rewrite_reasoning", "2",
    _AIDE_REWRITE_HEAD + "- Make it need more steps of reasoning, with different but simple content.\n" + _AIDE_REWRITE_TAIL,
)
AIDE_REWRITE_CONCRETE = Prompt(
    "aide_rewrite_concrete", "2",
    _AIDE_REWRITE_HEAD + "- Replace its general ideas with specific, concrete but simple details.\n" + _AIDE_REWRITE_TAIL,
)
AIDE_REWRITE_CONSTRAINT = Prompt(
    "aide_rewrite_constraint", "2",
    _AIDE_REWRITE_HEAD + "- Add one or two simple constraints or requirements to it.\n" + _AIDE_REWRITE_TAIL,
)
_AIDE_CREATE_TAIL = (
    "{answer_form}"
    "- Keep it concise.\n"
    "- Do not mention the words \"given instruction\", \"created instruction\" or any tag names in it.\n"
    "Put only the new instruction inside <Created Prompt></Created Prompt>.\n"
    "{response_form}\n"
    "{examples}"
    "Instruction: {instruction}"
)
# The create prompts are version 2: their tail gained {response_form}, as the rewrite tail (empty: the version-1 text).
AIDE_CREATE_PERSONA = Prompt(
    "aide_create_persona", "2",
    "You write instructions for training an assistant in {use_case}. Imagine you are this person: {persona}\n"
    "Write one new instruction that this person would ask. Requirements:\n"
    "- It must be related to the topic \"{topic}\" but differ from the instruction at the end, covering "
    "something that instruction does not.\n"
    + _AIDE_CREATE_TAIL,
)
AIDE_CREATE = Prompt(
    "aide_create", "2",
    "You write instructions for training an assistant in {use_case}. Write one new instruction. Requirements:\n"
    "- Choose a subject related to the topic \"{topic}\" in the same field, and make the new instruction more varied "
    "than the instruction at the end.\n"
    + _AIDE_CREATE_TAIL,
)
AIDE_ANSWER_MULTI = Prompt(
    "aide_answer_multi", "1",
    "Solve the question below step by step. Then write four answer options inside <Choices></Choices>, one per "
    "line: the right answer on a line that starts with \"Correct:\" and three plausible wrong answers on lines that "
    "start with \"Incorrect:\".\n\n"
    "Example\nQuestion: What is 7 * 6?\n7 * 6 = 42.\n<Choices>\nCorrect: 42\nIncorrect: 36\nIncorrect: 48\n"
    "Incorrect: 13\n</Choices>\n\n"
    "Question: {instruction}",
)
AIDE_ANSWER_BINARY = Prompt(
    "aide_answer_binary", "1",
    "Think about the question below step by step, then write the answer, Yes or No, inside <Choices></Choices>.\n\n"
    "Question: {instruction}",
)
AIDE_ANSWER_BINARY_SPEAKERS = Prompt(
    "aide_answer_binary_speakers", "1",
    "Below, Speaker 1 asks a question and Speaker 2 replies. Think step by step about whether Speaker 2's reply answers "
    "the question, plainly or by implication. Then write Yes (it answers it) or No (it does not) inside "
    "<Choices></Choices>.\n\n"
    "Dialogue: {instruction}",
)
AIDE_ANSWER_FREE = Prompt(
    "aide_answer_free", "1",
    "Answer the request below well and completely. Put the whole answer inside <Choices></Choices>.\n\n"
    "Request: {instruction}",
)
AIDE_GRADE_RELEVANCE = Prompt(
    "aide_grade_relevance", "1",
    "As an expert in {use_case}, rate how closely the new instruction is related to the original one, from 1 (unrelated) "
    "to 10 (about the same task). Write only the number inside <Score></Score>.\n\n"
    "Original instruction: {original}\nNew instruction: {instruction}",
)
AIDE_GRADE_DIVERSITY = Prompt(
    "aide_grade_diversity", "1",
    "As an expert in {use_case}, rate how different the new instruction is from the original one, from 1 (nearly the "
    "same) to 10 (a clearly different task). Write only the number inside <Score></Score>.\n\n"
    "Original instruction: {original}\nNew instruction: {instruction}",
)
AIDE_IMPROVE = Prompt(
    "aide_improve", "1",
    "You improve instructions written for training an assistant in {use_case}.\nOriginal instruction: {original}\n"
    "Instruction to improve: {instruction}\nFeedback: {feedback}\n"
    "Write a better version of the instruction to improve that follows the feedback, inside "
    "<Improved Prompt></Improved Prompt>.",
)
AIDE_FEEDBACK_TOO_LONG = Prompt(
    "aide_feedback_too_long", "1", "It is much longer than the original instruction; make it shorter and keep its task.",
)
AIDE_FEEDBACK_NOT_RELEVANT = Prompt(
    "aide_feedback_not_relevant", "1", "It has drifted away from the original instruction; bring it back to the same subject.",
)
AIDE_FEEDBACK_TOO_SIMILAR = Prompt(
    "aide_feedback_too_similar", "1", "It is almost the same as the original instruction; change its subject or task more.",
)
AIDE_CHECK_CHOICES = Prompt(
    "aide_check_choices", "1",
    "Work out the answer to the question below, then check whether that answer appears among the choices (for a "
    "single answer: whether the answer given is right). Write Yes or No inside <Response></Response>.\n\n"
    "Question: {instruction}\nChoices:\n{choices}",
)

# Few-shot examples of the rewrite and create prompts, chosen by a keyword of the use case (code, math,
# else general; yes/no questions have their own). Each is one worked example block.
_AIDE_EXAMPLE_SETS = {
    "code": ("Write a function that returns the largest number in a list.", {
        "reasoning": "Write a function that returns the second largest distinct number in a list, or None if there is none.",
        "concrete": "Write a Python function that returns the largest temperature in a list of daily readings in Celsius.",
        "constraint": "Write a function that returns the largest number in a list without using the built-in max.",
        "create": "Write a function that counts how many words in a sentence start with a capital letter.",
    }),
    "math": ("A shop sells pens at 3 dollars each. How much do 4 pens cost?", {
        "reasoning": "A shop sells pens at 3 dollars each and gives one free pen for every 4 bought. How much do 10 pens cost?",
        "concrete": "A stationery shop sells blue gel pens at 3 dollars each. How much do 4 gel pens cost?",
        "constraint": "A shop sells pens at 3 dollars each. How much do 4 pens cost with a 10% discount? Give the answer in cents.",
        "create": "A bus travels 60 km in 1.5 hours. What is its average speed in km per hour?",
    }),
    "general": ("Give some tips for a good night's sleep.", {
        "reasoning": "Explain why keeping the same bedtime each day helps sleep, and give two tips that follow from it.",
        "concrete": "Give three tips for a university student who sleeps badly before exams.",
        "constraint": "Give three tips for a good night's sleep, each in one sentence and none about medication.",
        "create": "Suggest a short evening routine that helps someone relax after work.",
    }),
    "yesno": ("Is 17 a prime number?", {
        "reasoning": "If a number is odd and not divisible by 3, 5 or 7, and it is less than 100, is it always prime?",
        "concrete": "Is 91, the number of days in a quarter of a year rounded down, a prime number?",
        "constraint": "Is 17 a prime number when we only test divisors up to its square root?",
        "create": "Is every square number also an even number?",
    }),
}


# The replies of the yes/no examples: a binary rewrite or created prompt also writes <Response>, a reply to its
# question (AIDE_RESPONSE_FORM) that answers it by implication or is about something unrelated.
_AIDE_YESNO_RESPONSES = {"reasoning": "Every one of those I have checked had no other divisors.",
                         "concrete": "My train leaves at seven tomorrow morning.",
                         "constraint": "Trying 2, 3 and 4 is enough, and none of them divides it.",
                         "create": "Nine is a square, and it is odd."}


def _aide_example(domain: str, kind: str) -> Prompt:
    """One worked example; the yes/no examples (version 3) also show the ``<Response>``, a reply to the question."""
    seed, outs = _AIDE_EXAMPLE_SETS[domain]
    tag = "Created Prompt" if kind == "create" else "Rewritten Prompt"
    text = f"Example\nInstruction: {seed}\n<{tag}>{outs[kind]}</{tag}>\n"
    if domain == "yesno" and kind in _AIDE_YESNO_RESPONSES:
        return Prompt(f"aide_example_{domain}_{kind}", "3", text + f"<Response>{_AIDE_YESNO_RESPONSES[kind]}</Response>\n\n")
    return Prompt(f"aide_example_{domain}_{kind}", "1", text + "\n")


AIDE_EXAMPLES = {(d, k): _aide_example(d, k) for d in _AIDE_EXAMPLE_SETS for k in ("reasoning", "concrete", "constraint", "create")}
AIDE_PROMPTS = (AIDE_TOPIC, AIDE_KG_EXPAND, AIDE_RESIDUAL, AIDE_ANSWER_FORM_BINARY, AIDE_RESPONSE_FORM, AIDE_REWRITE_REASONING,
                AIDE_REWRITE_CONCRETE, AIDE_REWRITE_CONSTRAINT, AIDE_CREATE_PERSONA, AIDE_CREATE, AIDE_ANSWER_MULTI, AIDE_ANSWER_BINARY,
                AIDE_ANSWER_BINARY_SPEAKERS,
                AIDE_ANSWER_FREE, AIDE_GRADE_RELEVANCE, AIDE_GRADE_DIVERSITY, AIDE_IMPROVE, AIDE_FEEDBACK_TOO_LONG,
                AIDE_FEEDBACK_NOT_RELEVANT, AIDE_FEEDBACK_TOO_SIMILAR, AIDE_CHECK_CHOICES, *AIDE_EXAMPLES.values())
ALL.update({p.id: p for p in AIDE_PROMPTS})

# -- evaluation (curate eval): a pairwise judge, asked twice with the answers swapped ------------

PAIRWISE_JUDGE_SYSTEM = Prompt(
    "pairwise_judge_system", "1",
    "You compare two answers to the same user request and decide which one serves the user better. "
    "Judge helpfulness, correctness, relevance and level of detail. The order in which the answers are "
    "shown and their length must not sway you. Explain your reasoning in a few sentences, then end with "
    "exactly one verdict on its own line: [[A]] if answer A is better, [[B]] if answer B is better, or "
    "[[C]] if they are equally good.",
)
PAIRWISE_JUDGE_SYSTEM_VERDICT = Prompt(
    "pairwise_judge_system_verdict", "1",
    "You compare two answers to the same user request and decide which one serves the user better. "
    "Judge helpfulness, correctness, relevance and level of detail. The order in which the answers are "
    "shown and their length must not sway you. Reply with the verdict only: [[A]] if answer A is better, "
    "[[B]] if answer B is better, or [[C]] if they are equally good.",
)
PAIRWISE_JUDGE = Prompt(
    "pairwise_judge", "1",
    "User request:\n{question}\n\n"
    "Answer A:\n{answer_a}\n\n"
    "Answer B:\n{answer_b}\n\n"
    "Which answer is better? Give your reasons, then the verdict: [[A]], [[B]] or [[C]].",
)
# verdict_token mode: the user prompt asks, as the system prompt does, for the verdict only (no reasons)
PAIRWISE_JUDGE_VERDICT = Prompt(
    "pairwise_judge_verdict", "1",
    "User request:\n{question}\n\n"
    "Answer A:\n{answer_a}\n\n"
    "Answer B:\n{answer_b}\n\n"
    "Which answer is better? Reply with the verdict only: [[A]], [[B]] or [[C]].",
)

# -- output shapes (decoding.constrain) -------------------------------------------------------------
# What a reply to a prompt must look like, for the backends that can enforce it while decoding (hf through
# xgrammar, vllm's structured outputs, an OpenAI-compatible server's response_format): a regex over the
# whole reply, or a JSON schema. Each shape is the layout its parser reads (curate/rewrite/reflection.py,
# curate/rewrite/aide.py, curate/scorers/judge.py, curate/scorers/ds2.py), with the free-text parts
# bounded in characters (all but the judge's explanation after its score line), so a model that would
# ramble is made to close its tags (a field cut at its bound is kept as written) instead of running into
# max_tokens. An answer prefix (the judges' answer_prefix) is the start of the reply: on hf it must
# match the shape.


def _regex(pattern: str) -> dict:
    return {"type": "regex", "pattern": pattern}


def _json(properties: dict, required: list[str]) -> dict:
    return {"type": "json_schema", "schema": {"type": "object", "properties": properties, "required": required,
                                              "additionalProperties": False}}


#: the start of a Reflection field: not a space, and not "your" in any case — the prompts' layout names
#: each slot "your …" ("[Better Answer] your better answer [End]"), and a small model copies the slot's
#: name instead of filling it (SmolLM2-135M did so on every row it was asked)
_NOT_YOUR = r"(?:[^\[\syY]|[yY](?:[^\[oO]|[oO](?:[^\[uU]|[uU](?:[^\[rR]|[rR][^\[\s]))))"


def _bracket_body(n: int) -> str:
    """A Reflection field of about 1..n characters, without ``[`` (it never opens a tag), starting as
    :data:`_NOT_YOUR` says. Every bounded part of a shape is one character class: xgrammar fills the
    token mask of a bounded repetition of a class in well under a millisecond, of a bounded alternation
    in hundreds of milliseconds (docs/benchmarks.md, constrained decoding)."""
    return _NOT_YOUR + r"[^\[]{0," + str(n - 1) + "}"


def _angle_body(n: int, newlines: bool = True) -> str:
    """An AIDE tag body of 1..n characters without ``<`` or ``>`` (newlines only when allowed)."""
    chars = r"[^<>]" if newlines else r"[^<>\n]"
    return r"[^<>\s]" + chars + "{0," + str(n - 1) + "}"


_ANALYSIS = r"Analysis: [^\[\n]{1,200}\n"
_ITEM = r"[^<>\n,\s][^<>\n,]{0,39}"
_QUOTED = r'"[^"\\\n]{1,60}"'
_REASONING = r"[^<]{0,300}"  # room to work the answer out before the tagged verdict
_YES_NO = r"(?:Yes|No)"

#: the output shape of each prompt that expects tags or a score (by prompt id)
SHAPES: dict[str, dict] = {
    REFLECT_INSTRUCTION.id: _regex(_ANALYSIS + r"\[New Instruction\] " + _bracket_body(300) + r" \[End\]\n"
                                   r"\[New Answer\] " + _bracket_body(800) + r" \[End\]"),
    REFLECT_RESPONSE.id: _regex(_ANALYSIS + r"\[Better Answer\] " + _bracket_body(800) + r" \[End\]"),
    REFLECT_COMPRESS.id: _regex(r"\[Merged Instruction\] " + _bracket_body(600) + r" \[End\]"),
    AIDE_TOPIC.id: _regex(r"<Topic>" + _ITEM + r"</Topic>\n<Related knowledge>" + _ITEM + r"(?:, " + _ITEM + r"){2}"
                          r"</Related knowledge>"),
    AIDE_KG_EXPAND.id: _regex(r"(?:\[" + _QUOTED + ", " + _QUOTED + ", " + _QUOTED + r"\]\n){0,7}"
                              r"\[" + _QUOTED + ", " + _QUOTED + ", " + _QUOTED + r"\]"),
    AIDE_REWRITE_REASONING.id: _regex(r"<Rewritten Prompt>" + _angle_body(300) + r"</Rewritten Prompt>"),
    AIDE_CREATE.id: _regex(r"<Created Prompt>" + _angle_body(300) + r"</Created Prompt>"),
    AIDE_ANSWER_MULTI.id: _regex(_REASONING + r"<Choices>\nCorrect: " + _angle_body(80, False)
                                 + (r"\nIncorrect: " + _angle_body(80, False)) * 3 + r"\n</Choices>"),
    AIDE_ANSWER_BINARY.id: _regex(_REASONING + r"<Choices>" + _YES_NO + r"</Choices>"),
    # a free answer may hold a few "<" (code, comparisons), none opening a closing tag
    AIDE_ANSWER_FREE.id: _regex(r"<Choices>[^<\s][^<]{0,399}(?:<[^/<][^<]{0,99}){0,4}</Choices>"),
    AIDE_GRADE_RELEVANCE.id: _regex(r"<Score>(?:10|[1-9])</Score>"),
    AIDE_IMPROVE.id: _regex(r"<Improved Prompt>" + _angle_body(300) + r"</Improved Prompt>"),
    AIDE_CHECK_CHOICES.id: _regex(_REASONING + r"<Response>" + _YES_NO + r"</Response>"),
    # the score line is what the judge reads; the explanation after it is left free (a bounded last
    # part took xgrammar seconds to compile, and a cut explanation costs the rating nothing)
    RUBRIC_ACCURACY_0_5.id: _regex(r"Score: [0-5]\n[^\n]*"),
    RUBRIC_QUALITY_1_10_JSON.id: _json({"score": {"type": "integer", "minimum": 1, "maximum": 10},
                                        "reason": {"type": "string", "minLength": 1, "maxLength": 200}}, ["score", "reason"]),
    DS2_USER.id: _json({k: {"type": "integer", "minimum": 1, "maximum": 10}
                        for k in ("Rarity", "Complexity", "Informativeness", "Overall rating")},
                       ["Rarity", "Complexity", "Informativeness", "Overall rating"]),
}
SHAPES.update({REFLECT_INSTRUCTION_INPUT.id: SHAPES[REFLECT_INSTRUCTION.id], REFLECT_RESPONSE_INPUT.id: SHAPES[REFLECT_RESPONSE.id],
               AIDE_REWRITE_CONCRETE.id: SHAPES[AIDE_REWRITE_REASONING.id], AIDE_REWRITE_CONSTRAINT.id: SHAPES[AIDE_REWRITE_REASONING.id],
               AIDE_CREATE_PERSONA.id: SHAPES[AIDE_CREATE.id], AIDE_ANSWER_BINARY_SPEAKERS.id: SHAPES[AIDE_ANSWER_BINARY.id],
               AIDE_GRADE_DIVERSITY.id: SHAPES[AIDE_GRADE_RELEVANCE.id]})
#: what a binary rewrite or created prompt adds after its tag (AIDE_RESPONSE_FORM): a reply of three or more words
AIDE_RESPONSE_SHAPE = r"\n<Response>[^<>\s]{1,30}(?: [^<>\s]{1,30}){2,40}</Response>"


def with_response(shape: dict) -> dict:
    """A rewrite or create shape followed by the binary ``<Response>`` (:data:`AIDE_RESPONSE_SHAPE`)."""
    return _regex(shape["pattern"] + AIDE_RESPONSE_SHAPE)
