"""sentence-transformers embeddings (default: the bundled all-MiniLM-L6-v2, 384-d, max 256 tokens).

Text per record (``embed.text``): ``conversation`` = the role-prefixed conversation
(``User: …\\nAssistant: …``), ``prompt`` = non-assistant text, ``response`` = assistant text. Long
texts are represented by their beginning (the model's ``max_seq_length``), as sentence-transformers
does; the length is recorded in the fingerprint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from curate.embed.base import EmbedContext, Embedder
from curate.embed.spec import EmbedSpec
from curate.models import cached, resolve_model, set_torch_threads

VERSION = "1.0"


class SentenceTransformerEmbedder(Embedder):
    """``embed(texts) -> float32 array (n, dim)``, L2-normalised when ``normalize``."""

    method = "sentence_transformers"
    version = VERSION

    def __init__(self, name: str, params: EmbedSpec | dict[str, Any] | None = None, context: EmbedContext | None = None):
        super().__init__(name, params, context)
        self.resolved = resolve_model(self.spec.model, self.spec.revision)
        self._model = None

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
            **self.storage_fingerprint(),
        }

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        set_torch_threads(self.torch_threads)
        with torch.inference_mode():
            vecs = self.model.encode(
                texts,
                batch_size=self.spec.batch_size,
                normalize_embeddings=self.spec.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vecs, dtype=np.float32)
