"""sentence-transformers embeddings (default: the bundled all-MiniLM-L6-v2, 384-d, max 256 tokens).

Text per record (``embed.text``): ``conversation`` = the role-prefixed conversation
(``User: …\\nAssistant: …``), ``prompt`` = non-assistant text, ``response`` = assistant text. Long
texts are represented by their beginning (the model's ``max_seq_length``), as sentence-transformers
does; the length is recorded in the fingerprint.

``embed.backend`` onnx / openvino (CPU): sentence-transformers still tokenises and pools; the transformer runs
under ONNX Runtime or OpenVINO from a model exported once (:mod:`curate.embed.export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from curate.embed.base import EmbedContext, Embedder
from curate.embed.export import (CPU_FAST, EXPORT_NOTE, EXPORT_PACKAGES, EXPORT_VERSION, INT8_SCHEME, export_folder, export_model,
                                  open_runtime, package_versions, preprocess)
from curate.embed.spec import EmbedSpec
from curate.models import cached, resolve_model, set_torch_threads

VERSION = "1.0"


def resolve_backend(spec: EmbedSpec, resolved) -> tuple[str, str]:
    """(backend, why) for ``embed.backend: auto``: ``openvino`` for a bundled or local model (its folder says whether
    it has a default prompt, which the exported path cannot add; a hub model is not looked up, so its choice does not
    depend on the hub cache) on the CPU in float32 without quantisation, where openvino and the exporter (onnx) import;
    else ``torch``."""
    import json

    from curate.errors import importable
    from curate.lm.base import openvino_installed

    if spec.device != "cpu" or spec.dtype != "float32" or spec.quantize != "none":
        return "torch", "auto: not float32 on the CPU"
    if spec.trust_remote_code:
        return "torch", "auto: a model with its own code (its export is not checked)"
    if resolved.source == "hub":
        return "torch", "auto: a hub model (its export is not checked ahead)"
    root = Path(resolved.location)
    try:
        st_config = root / "config_sentence_transformers.json"
        if st_config.exists() and json.loads(st_config.read_text()).get("default_prompt_name"):
            return "torch", "auto: the model has a default prompt (the exported path does not add it)"
        modules = json.loads((root / "modules.json").read_text()) if (root / "modules.json").exists() else []
    except (OSError, ValueError):
        return "torch", "auto: its sentence-transformers config does not read"
    if not modules or not str(modules[0].get("type", "")).endswith("Transformer"):
        return "torch", "auto: its first module is not a Transformer (the exporter runs only those)"
    if not openvino_installed() or not importable("onnx"):
        return "torch", f"auto: openvino or onnx is not installed ({CPU_FAST})"
    return "openvino", "auto: on a CPU with openvino installed (curate[cpu-fast])"


#: export/load failures of this process, by export key: raised again at once (not retried for every row)
_FAILED: dict[str, Exception] = {}


class SentenceTransformerEmbedder(Embedder):
    """``embed(texts) -> float32 array (n, dim)``, L2-normalised when ``normalize``."""

    method = "sentence_transformers"
    version = VERSION

    def __init__(self, name: str, params: EmbedSpec | dict[str, Any] | None = None, context: EmbedContext | None = None):
        super().__init__(name, params, context)
        self.resolved = resolve_model(self.spec.model, self.spec.revision)
        if self.spec.backend == "auto":  # resolved once: the store key holds what runs
            backend, self.backend_reason = resolve_backend(self.spec, self.resolved)
            self.params = self.spec.model_copy(update={"backend": backend})
        else:
            self.backend_reason = "set in the flow"
        self._model = None
        self._runner = None

    @property
    def model(self):
        if self._model is None:
            from curate.errors import require

            require("sentence_transformers", "the embed stage", "pip install sentence-transformers")
            set_torch_threads(self.torch_threads)
            r, s = self.resolved, self.spec
            self._model = cached(("st", r.location, r.revision, s.device, s.dtype, s.trust_remote_code), self._load)
            if s.max_seq_length:
                self._model.max_seq_length = s.max_seq_length
        return self._model

    @property
    def runner(self):
        """The exported transformer (``embed.backend`` onnx / openvino): ``runner(feed) -> (batch, tokens, hidden)``."""
        if self._runner is None:
            s = self.spec
            module, step = ("onnxruntime", "embed.backend: onnx") if s.backend == "onnx" else ("openvino", "embed.backend: openvino")
            from curate.errors import require

            require(module, step, CPU_FAST)
            require("onnx", step, CPU_FAST)  # the exporter
            threads = set_torch_threads(self.torch_threads)
            key = self.export_key()
            if key in _FAILED:
                raise _FAILED[key]
            try:
                folder = self.export_dir()  # exported (10-90 s) outside the process cache's lock; the rename keeps it whole
                self._runner = cached(("st-runtime", str(folder), s.backend, threads), lambda: open_runtime(folder, s.backend, threads))
            except Exception as exc:  # noqa: BLE001 - kept: the next batch fails at once with the same message
                from curate.errors import CurateError

                _FAILED[key] = CurateError(f"embed.backend: {s.backend} could not export or load {s.model}: {type(exc).__name__}: "
                                           f"{exc} (set embed.backend: torch)")
                raise _FAILED[key] from exc
        return self._runner

    def export_key(self) -> str:
        """The export folder's key: model location and revision, backend, quantisation, exporting libraries' versions."""
        from curate.records import canonical_json, sha256_hex

        s = self.spec
        versions = package_versions(EXPORT_PACKAGES[s.backend])
        return sha256_hex(canonical_json({"location": self.resolved.location, "revision": self.resolved.revision, "backend": s.backend,
                                          "quantize": self._quantize_label(), "trust_remote_code": s.trust_remote_code,
                                          "export": EXPORT_VERSION,
                                          "versions": versions}))[:32]

    def export_dir(self) -> Path:
        """The exported model's folder; exported now (to a temporary folder, then renamed) if not there yet."""
        target = export_folder(self.export_key())
        if not (target / EXPORT_NOTE).exists():
            export_model(self.model, target, self.spec.backend, self.spec.quantize, self._quantize_label())
        return target

    def _quantize_label(self) -> str | None:
        return None if self.spec.quantize == "none" else f"{self.spec.quantize}:{INT8_SCHEME[self.spec.backend]}"

    def _load(self):
        import torch
        from sentence_transformers import SentenceTransformer

        r, s = self.resolved, self.spec
        try:
            model = SentenceTransformer(
                r.location,
                device=s.device,
                revision=r.revision if r.source == "hub" else None,
                trust_remote_code=s.trust_remote_code,
            )
        except OSError as exc:
            from curate.errors import CurateError

            raise CurateError(f"embedding model '{s.model}' could not be loaded ({r.source}: {r.location}): {exc}") from None
        if s.dtype != "float32":
            model = model.to(getattr(torch, s.dtype))
        model.eval()
        return model

    def _describe(self) -> dict[str, Any]:
        """max_seq_length, pooling and dim: read from the model's files when local, else loaded."""
        import json
        from pathlib import Path

        if self.resolved.source != "hub":
            root = Path(self.resolved.location)
            try:
                bert = json.loads((root / "sentence_bert_config.json").read_text())
                modules = json.loads((root / "modules.json").read_text())
                pool_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
                pool = json.loads((root / pool_dir / "config.json").read_text())
                modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens") for k, v in pool.items()
                         if k.startswith("pooling_mode") and v is True]
                return {"max_seq_length": int(bert["max_seq_length"]), "pooling": "+".join(modes),
                        "dim": int(pool["word_embedding_dimension"])}
            except (OSError, KeyError, StopIteration, ValueError):
                pass
        model = self.model
        pooling = next((m.get_pooling_mode_str() for m in model if type(m).__name__ == "Pooling"), None)
        return {"max_seq_length": int(model.max_seq_length), "pooling": pooling, "dim": int(model.get_sentence_embedding_dimension())}

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the vectors; computed without loading the model when local."""
        info = self._describe()
        if self.spec.max_seq_length:
            info["max_seq_length"] = self.spec.max_seq_length
        return {
            "method": "sentence_transformers",
            "embedder_version": VERSION,
            "model_id": self.spec.model,
            "model_revision": self.resolved.revision,
            "text": self.spec.text,
            "normalize": self.spec.normalize,
            "dtype": self.spec.dtype,
            **info,
            **self._backend_fingerprint(),
            **self.storage_fingerprint(),
        }

    def _backend_fingerprint(self) -> dict[str, Any]:
        """Empty for the default torch backend (so its keys are the keys they were); else the backend and quantisation,
        and for int8 the runtime's and quantiser's versions (another version may quantise differently)."""
        s = self.spec
        if s.backend == "torch":
            return {}
        if s.quantize == "none":
            return {"backend": s.backend}
        versions = package_versions(EXPORT_PACKAGES[s.backend])
        return {"backend": s.backend, "quantize": self._quantize_label(), "quantizer_versions": versions}

    @property
    def dim(self) -> int:
        model = self.model  # sentence-transformers ≥ 6 renamed the method (the old name warns)
        return int((getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)())

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        set_torch_threads(self.torch_threads)
        if self.spec.backend != "torch":
            with torch.inference_mode():
                return self._embed_exported(texts)
        with torch.inference_mode():
            vecs = self.model.encode(
                texts,
                batch_size=self.spec.batch_size,
                normalize_embeddings=self.spec.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vecs, dtype=np.float32)

    def _embed_exported(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32: longest texts first in batches of ``batch_size`` (as sentence-transformers does), the
        transformer run by the exported model, then the model's own pooling (and normalisation) modules."""
        import torch

        model = self.model
        if getattr(model, "default_prompt_name", None):  # encode() would prepend it; the exported path does not
            from curate.errors import CurateError

            raise CurateError(f"embed.backend: {self.spec.backend} does not add the model's default prompt "
                              f"({model.default_prompt_name!r}): use backend torch for '{self.spec.model}'")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:  # nothing to run: no export
            return out
        run = self.runner
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(texts), self.spec.batch_size):
            idx = order[start : start + self.spec.batch_size]
            feats = preprocess(model, [texts[i] for i in idx])
            hidden = run({k: v.numpy() for k, v in feats.items() if isinstance(v, torch.Tensor)})
            feats["token_embeddings"] = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
            for module in list(model)[1:]:
                feats = module(feats)
            vecs = feats["sentence_embedding"].float()
            if self.spec.normalize:
                vecs = torch.nn.functional.normalize(vecs, p=2, dim=1)
            out[idx] = vecs.numpy()
        return out
