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
