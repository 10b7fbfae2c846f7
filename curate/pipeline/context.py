"""What a flow's plug-ins get from the run: torch threads, the seed, the store's caches.

The stages build their scorers, rewriters and embedders with these (and :func:`curate.pipeline.build.model_keys`
computes the store keys with the same), so a task and the run that planned it agree on every key.
"""

from __future__ import annotations

import os

from curate.config import FlowSpec


def torch_threads(spec: FlowSpec) -> int:
    return spec.runtime.torch_threads or min(2, os.cpu_count() or 1)


def scorer_context(spec: FlowSpec):
    """What scorers get from the run: threads, seed, and where API responses are cached (the store's
    ``requests/``, which every worker reaches, a URL store included)."""
    from curate.scorers import ScorerContext
    from curate.store import request_cache

    return ScorerContext(torch_threads=torch_threads(spec), seed=spec.seed, extra={"request_cache": str(request_cache(spec.store))})


def rewrite_context(spec: FlowSpec):
    """What rewriters get from the run: seed, threads, the project root, the store (LLM call cache)
    and the flow's embedder (AIDE dedups and picks personas with it)."""
    from curate.rewrite import RewriteContext

    return RewriteContext(seed=spec.seed, torch_threads=torch_threads(spec), base_dir=str(spec.base), store_dir=str(spec.local_store),
                          extra={"embed": spec.embed})
