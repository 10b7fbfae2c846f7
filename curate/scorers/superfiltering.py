"""Superfiltering — IFD with a small proxy model (methods.md A2).

The IFD engine with the Superfiltering settings: no template (the prompt is ``{q}\\n``), the bare
response as the direct pass, and the perplexity ratio ``PPL_c / PPL_d``. With no BOS token (GPT-2)
the first response token cannot be scored in the direct pass — reproduced, as in the reference.
Default model: the bundled SmolLM2-135M-Instruct (the paper uses GPT-2, 124M; any causal LM works).

Select with ``threshold`` (``max: 1``, ``max_inclusive: false``: keep IFD < 1) then ``top_k`` by
``superfiltering.ifd`` (see ``flows/superfilter.yaml``). Failures are NaN with a status, never the
reference's 0 sentinel that passes the < 1 filter.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from curate.scorers.ifd import IFDParams, IFDScorer


class SuperfilteringParams(IFDParams):
    template: Literal["alpaca", "wiz", "vicuna", "none", "chat"] = "none"
    ratio: Literal["loss", "ppl"] = "ppl"
    direct_prefix: Literal["header", "bare"] = "bare"
    max_length: int = Field(1024, gt=1)


class SuperfilteringScorer(IFDScorer):
    method = "superfiltering"
    version = "1.1"
    Params = SuperfilteringParams
