"""The hf backend's model forward compiled by OpenVINO (``runtime: openvino``): the same fp32 weights, the same numbers
as torch within about 1e-5 relative, 2.3–2.5× faster than torch fp32 on the CPU measured (bench/results/runtime_scoring.md).

One graph per model (:func:`logits_module`): token ids (batch × width, right padding) in; at ``idx`` (n flat positions
``row × width + position``) the logits of ``cand`` (n × k token ids) and the full-vocabulary log-sum-exp out, both fp32
— the head and the log-sum-exp run only at the chosen positions, as in the torch engine. There is no padding mask: with
right padding a causal model's real positions never attend to the padding after them (their outputs are the same with
or without one), so the graph treats every position as real and builds only the causal (and sliding-window) mask from
the width. (With a padding mask, the padded rows of a sliding-window model see nothing but padding; OpenVINO's attention
turned those rows into NaN, which then reached real rows.) Scoring asks for one candidate per position (the next token:
its log-probability is ``logits - lse``); the rating-token judges ask for k. Batch, width, n and k are dynamic: one
compiled model serves every batch.

:func:`graph_folder` exports it once per model into ``$CURATE_CACHE_DIR/lm-graphs/<key>`` (OpenVINO IR, fp32: about 4
bytes per parameter on disk, 538 MB for SmolLM2-135M; ``openvino`` traces the torch module, about 10 s for that model),
keyed by the model, its revision (for a local folder also its files' sizes and modification times) and the versions of
torch, transformers and openvino. Processes on one machine take turns (a file lock); the export is written to a hidden
temporary folder and renamed, so a failed export leaves nothing that is used (a killed one can leave that hidden
``.<key>.*`` folder behind: safe to delete). :class:`CompiledGraph` compiles it for the CPU with an explicit fp32
inference precision (OpenVINO's default on AMX CPUs is bf16, which ranks Cherry Alpaca rows at Spearman 0.997) and an
explicit thread count.

The graph materialises n × vocabulary fp32 logits per batch (the torch engine works in chunks of 24 MB); the hf backend
caps the batch so that they stay under 1 GiB (``HFBackend._engine_budget``). The trace fixes Python-level choices:
models whose RoPE scaling is ``dynamic`` (it branches on the sequence length in Python) are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from curate.models import CPU_FAST

log = logging.getLogger("curate")

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
    versions of :data:`GRAPH_PACKAGES`, and for a local folder each file's name, size and modification time — a model
    retrained into the same folder gets a new export)."""
    from curate.models import package_versions

    ident = {"location": location, "revision": revision, "graph": GRAPH_VERSION, "packages": package_versions(GRAPH_PACKAGES)}
    local = Path(location)
    if local.is_dir():
        ident["files"] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in local.iterdir() if f.is_file())
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{Path(location).name or 'model'}-{digest}"


def graph_folder(location: str, revision: str | None, load_model) -> Path:
    """The folder holding the model's exported graph (:data:`GRAPH_FILE`), exported once from ``load_model()`` (an fp32
    transformers causal LM, loaded only when the folder is missing and dropped after the export). Processes exporting
    the same model wait for each other (``fcntl`` lock beside the folder; none on systems without it)."""
    from curate.models import _made_once, cache_dir

    target = cache_dir() / "lm-graphs" / graph_key(location, revision)
    if (target / NOTE).exists():
        return target

    def make(tmp: Path) -> None:
        import gc

        log.info("runtime: openvino: exporting %s once into %s (later runs reuse it)", location, target)
        model = load_model()
        refuse_unsupported(model.config)
        export(model, tmp / GRAPH_FILE)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        del model
        gc.collect()
        (tmp / NOTE).write_text(json.dumps({"location": location, "revision": revision, "graph": GRAPH_VERSION, "vocab": vocab},
                                           indent=1) + "\n")

    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        return _made_once(target, NOTE, make)


@contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not on this system: concurrent exports race, and the rename keeps one
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def refuse_unsupported(config) -> None:
    """Raise :class:`~curate.errors.CurateError` for a model the traced graph would get wrong: RoPE scaling ``dynamic``
    (it picks its frequencies with a Python ``if`` on the sequence length, which the trace fixes at the example's)."""
    from curate.errors import CurateError

    for params in (getattr(config, "rope_scaling", None), getattr(config, "rope_parameters", None)):
        if isinstance(params, dict) and "dynamic" in (params.get("rope_type"), params.get("type")):
            raise CurateError("runtime: openvino cannot run a model with dynamic RoPE scaling (the traced graph would fix its "
                              "length-dependent choice): set runtime: torch")


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
        # the tracer's notes on Python booleans taken from shapes (transformers' mask and q_length == 1 checks)
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
        self.vocab = int(json.loads((folder / NOTE).read_text())["vocab"])
        self.compiled = ov.Core().compile_model(str(folder / GRAPH_FILE), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY"})

    def request(self):
        return self.compiled.create_infer_request()


def run(request, ids: np.ndarray, idx: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One inference over right-padded ``ids``: the candidates' logits (n × k) and the log-sum-exp (n), copied out of the
    request's buffers."""
    out = request.infer({"input_ids": ids, "idx": idx, "cand": cand})
    return np.array(out[OUTPUTS[0]], copy=True), np.array(out[OUTPUTS[1]], copy=True)
