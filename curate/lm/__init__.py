"""Language-model backends behind one small interface (see :mod:`curate.lm.base`)."""

from __future__ import annotations

from pathlib import Path

from curate.lm.engine import MaskedCE, Seq, SeqResult
from curate.lm.spec import LMParams


def load_backend(params: LMParams, torch_threads: int | None = None, cache_dir: str | Path | None = None):
    """The backend named by ``params.backend``; nothing heavy is loaded until it is used."""
    if params.backend == "hf":
        from curate.lm.hf import HFBackend

        return HFBackend(params, torch_threads)
    if params.backend == "vllm":
        from curate.lm.vllm import VLLMBackend

        return VLLMBackend(params, torch_threads)
    from curate.lm.openai import OpenAIBackend

    return OpenAIBackend(params, torch_threads, cache_dir)


__all__ = ["LMParams", "MaskedCE", "Seq", "SeqResult", "load_backend"]
