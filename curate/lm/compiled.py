"""The hf backend's model forward compiled by OpenVINO (``runtime: openvino``): the same fp32 weights, the same numbers
as torch within about 1e-5 relative, 1.9–3× faster on the CPUs measured (bench/results/runtime_scoring.md).

One graph per model (:func:`logits_module`): token ids (batch × width, right padding) in; at ``idx`` (n flat positions
``row × width + position``) the logits of ``cand`` (n × k token ids) and the full-vocabulary log-sum-exp out, both fp32
— the head and the log-sum-exp run only at the chosen positions, as in the torch engine. There is no attention mask:
with right padding a causal model's real positions never see the padding after them (their outputs are the same with
or without it), and the graph runs the causal attention kernel without a mask to build. (With a mask, the padded rows of
a sliding-window model see nothing but padding and OpenVINO's attention turns them into NaN, which then reached real
rows; without one, every row sees itself.)
Scoring asks for one candidate per position (the next token: its log-probability is ``logits - lse``); the rating-token
judges ask for k. Batch, width, n and k are dynamic: one compiled model serves every batch.

:func:`graph_folder` exports it once per model into ``$CURATE_CACHE_DIR/lm-graphs/<key>`` (OpenVINO IR; ``openvino``
converts the torch module directly, about 10 s for SmolLM2-135M), keyed by the model, its revision and the versions of
torch, transformers and openvino; written to a temporary folder and renamed, so a killed export leaves nothing half
made. :func:`compile_graph` compiles it for the CPU with an explicit fp32 inference precision (OpenVINO's default on
AMX CPUs is bf16, which ranks Cherry Alpaca rows at Spearman 0.997) and an explicit thread count.

The graph materialises n × vocabulary fp32 logits per batch (the torch engine works in chunks of 24 MB): about
300 MB for 1,500 scored tokens of a 49k vocabulary; lower ``max_tokens_per_batch`` for very large vocabularies.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

#: the pip line of the CPU runtimes (the ``cpu-fast`` extra)
CPU_FAST = "pip install 'curate[cpu-fast]'"
#: this module's graph format (inputs, outputs, what runs in fp32): in the export's key
GRAPH_VERSION = "2"
#: the libraries whose versions enter the export's key
GRAPH_PACKAGES = ("torch", "transformers", "openvino")
#: the exported graph's file (with its ``.bin`` beside it)
GRAPH_FILE = "logits.xml"
#: beside it: what was exported (location, revision, graph version, vocabulary size)
NOTE = "export.json"
INPUTS = ("input_ids", "idx", "cand")
OUTPUTS = ("logits", "lse")


def logits_module(model):
    """A torch module over a causal LM: ``(input_ids: B × W int64, right-padded; idx: n int64; cand: n × k int64)`` →
    ``(logits: n × k, lse: n)`` in fp32 — the LM head (with the model's logit soft-cap, if any) and a max-subtracted
    log-sum-exp over the vocabulary, at the hidden states ``idx`` of the flattened batch only (no attention mask: see the
    module's docstring)."""
    import torch

    cap = getattr(model.config, "final_logit_softcapping", None)

    class CandidateLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = model.get_decoder(), model.get_output_embeddings()

        def forward(self, input_ids, idx, cand):
            ones = torch.ones_like(input_ids)  # every position "real" (see the module's docstring); no mask, no packed-sequence check
            h = self.body(input_ids=input_ids, attention_mask=ones, use_cache=False).last_hidden_state
            logits = self.head(h.reshape(-1, h.shape[-1]).index_select(0, idx)).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            top = logits.amax(dim=-1, keepdim=True)
            lse = (logits - top).exp().sum(dim=-1).log() + top.squeeze(-1)
            return logits.gather(1, cand), lse

    return CandidateLogits().eval()


def graph_key(location: str, revision: str | None) -> str:
    """The export folder's name: the model's last path part and a digest of (location, revision, graph version, the
    versions of :data:`GRAPH_PACKAGES`)."""
    from curate.embed.export import package_versions

    ident = {"location": location, "revision": revision, "graph": GRAPH_VERSION, "packages": package_versions(GRAPH_PACKAGES)}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{Path(location).name or 'model'}-{digest}"


def graph_folder(location: str, revision: str | None, load_model) -> Path:
    """The folder holding the model's exported graph (:data:`GRAPH_FILE`), exported once from ``load_model()`` (an fp32
    transformers causal LM; only called when the folder is missing)."""
    from curate.models import _made_once, cache_dir

    def make(tmp: Path) -> None:
        model = load_model()
        export(model, tmp / GRAPH_FILE)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        (tmp / NOTE).write_text(json.dumps({"location": location, "revision": revision, "graph": GRAPH_VERSION, "vocab": vocab},
                                           indent=1) + "\n")

    return _made_once(cache_dir() / "lm-graphs" / graph_key(location, revision), NOTE, make)


def export(model, path: Path) -> None:
    """Convert :func:`logits_module` of ``model`` to OpenVINO IR at ``path`` (fp32 weights, every dimension dynamic).

    The example batch is wider than the model's attention window, if it has one: transformers skips building a
    sliding-window mask for a batch narrower than the window, and the trace would keep that choice for every width."""
    import torch

    from curate.errors import require

    ov = require("openvino", "runtime: openvino", CPU_FAST)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    width = max(16, int(getattr(model.config, "sliding_window", None) or 0) + 2)
    ids = torch.arange(2 * width, dtype=torch.int64).reshape(2, width) % vocab
    idx = torch.tensor([3, 4, 5, width + 4, width + 5], dtype=torch.int64)
    cand = torch.tensor([[1, 2], [2, 3], [3, 4], [4, 5], [5, 6]], dtype=torch.int64) % vocab
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on Python booleans taken from shapes (the padding checks above, the q_length == 1 fast path)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace's own (openvino traces the module with it)
        warnings.simplefilter("ignore", FutureWarning)  # transformers' notes on attributes the tracer reads
        graph = ov.convert_model(logits_module(model), example_input=(ids, idx, cand))
    for port, name in zip(graph.inputs, INPUTS):
        port.get_tensor().set_names({name})
    for port, name in zip(graph.outputs, OUTPUTS):
        port.get_tensor().set_names({name})
    ov.save_model(graph, str(path), compress_to_fp16=False)


class CompiledGraph:
    """An exported graph compiled for the CPU (``threads``: OpenVINO's inference threads); :func:`run` runs it on one of
    its :meth:`request` objects (one inference at a time each; the compiled model serves many). ``vocab``: the model's
    vocabulary size (OpenVINO's embedding lookup does not check its ids: the engine does)."""

    def __init__(self, folder: Path, threads: int):
        from curate.errors import require

        ov = require("openvino", "runtime: openvino", CPU_FAST)
        self.threads = int(threads)
        self.version = ov.__version__
        self.vocab = int(json.loads((folder / NOTE).read_text())["vocab"])
        self.compiled = ov.Core().compile_model(str(folder / GRAPH_FILE), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY"})

    def request(self):
        return self.compiled.create_infer_request()

    def describe(self) -> dict[str, Any]:
        return {"runtime": "openvino", "openvino": self.version, "threads": self.threads,
                "inference_precision": str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))}


def run(request, ids: np.ndarray, idx: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One inference over right-padded ``ids``: the candidates' logits (n × k) and the log-sum-exp (n), copied out of the
    request's buffers."""
    out = request.infer({"input_ids": ids, "idx": idx, "cand": cand})
    return np.array(out[OUTPUTS[0]], copy=True), np.array(out[OUTPUTS[1]], copy=True)
