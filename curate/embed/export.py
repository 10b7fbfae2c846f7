"""Embedding models exported for CPU runtimes (``embed.backend``: onnx, openvino): the transformer of a
SentenceTransformer exported once with ``torch.onnx.export`` (float32; ``quantize: int8``: ONNX Runtime's dynamic
int8 quantisation of the weight MatMuls but the feed-forward down projections, or NNCF's int8 weight compression for
OpenVINO) into a folder under the curate cache (:func:`export_folder`), keyed by the model, its revision, backend,
quantisation and the exporting libraries' versions; written to a temporary folder and renamed, so a killed export
leaves no half model and later runs reuse it. :func:`open_runtime` runs it.

(sentence-transformers' own ``backend=`` needs optimum, which does not install beside transformers 5.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curate.models import CPU_FAST, package_versions  # noqa: F401 - CPU_FAST: the embedders import it from here

#: ``quantize: int8`` per backend (in the fingerprint: another scheme makes other vectors, so another store key)
INT8_SCHEME = {"onnx": "ort-dynamic-qint8-matmul-per-channel-except-narrowing", "openvino": "nncf-int8-weights-asym"}
#: the libraries whose versions enter an export's folder key, per backend
EXPORT_PACKAGES = {"onnx": ("torch", "transformers", "sentence-transformers", "onnx", "onnxruntime"),
                   "openvino": ("torch", "transformers", "sentence-transformers", "onnx", "openvino", "nncf")}
#: the exporting code's version (opset, exporter, graph outputs): in the export folder's key
EXPORT_VERSION = "1"


def export_folder(key: str) -> Path:
    """Where the export named ``key`` is kept: ``$CURATE_CACHE_DIR/embed-models/<key>`` (a model, like the merged
    adapters, not data: shared by every store of the machine)."""
    from curate.models import cache_dir

    return cache_dir() / "embed-models" / key


#: written last into an export folder: what it holds (a folder without it is not used)
EXPORT_NOTE = "export.json"
#: the exported graph's output
HIDDEN = "last_hidden_state"


def preprocess(model, texts: list[str]) -> dict[str, Any]:
    """The tokeniser's features of ``texts`` (``preprocess`` in sentence-transformers ≥ 5, ``tokenize`` before)."""
    return (getattr(model, "preprocess", None) or model.tokenize)(texts)


def export_model(model, target: Path, backend: str, quantize: str, label: str | None) -> None:
    """Export ``model``'s transformer for ``backend`` into ``target``: built in a temporary sibling folder, then renamed
    (a killed export leaves no half model; a concurrent export that finished first is kept)."""
    import json
    import os
    import shutil

    from curate.io import temp_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, f".{target.name}.")  # the mode mkdir gives (others can read a shared cache)
    try:
        names = _export_onnx(model, tmp / "model.onnx")
        if backend == "onnx" and quantize == "int8":
            _quantize_onnx(tmp / "model.onnx", tmp / "model.int8.onnx")
            (tmp / "model.onnx").unlink()
            (tmp / "model.int8.onnx").rename(tmp / "model.onnx")
        elif backend == "openvino":
            _to_openvino(tmp / "model.onnx", tmp / "model.xml", quantize)
            (tmp / "model.onnx").unlink()
        note = {"backend": backend, "quantize": label, "inputs": names, "output": HIDDEN,
                "file": "model.onnx" if backend == "onnx" else "model.xml"}
        (tmp / EXPORT_NOTE).write_text(json.dumps(note, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if (target / EXPORT_NOTE).exists():  # another process finished the same export first: keep its folder
                return
            shutil.rmtree(target, ignore_errors=True)  # a folder without the note was not written by an export: replace it
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / EXPORT_NOTE).exists():  # not another export that finished meanwhile
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_onnx(model, path: Path) -> list[str]:
    """The transformer of a SentenceTransformer as ONNX (float32; batch and token axes dynamic); returns its input names."""
    import warnings

    import torch

    hf = model[0].auto_model
    example = preprocess(model, ["an example sentence", "a second, longer example sentence for the export"])
    names = [k for k, v in example.items() if isinstance(v, torch.Tensor)]

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, *tensors):
            return self.hf(**dict(zip(names, tensors)), return_dict=True)[HIDDEN]

    axes = {n: {0: "batch", 1: "tokens"} for n in [*names, HIDDEN]}
    with warnings.catch_warnings(), torch.no_grad():  # the tracer's warnings are about shapes made dynamic by ``axes``
        warnings.simplefilter("ignore")
        torch.onnx.export(Body().eval(), tuple(example[n] for n in names), str(path), input_names=names, output_names=[HIDDEN],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return names


def _quantize_onnx(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantisation: the weight MatMuls int8 per output channel (activations quantised per batch),
    except the ones that narrow (more inputs than outputs: the feed-forward down projections), whose inputs (after the
    activation function) are too heavy-tailed for 8 bits — kept float32, every row keeps cosine ≥ 0.99 to fp32."""
    import logging

    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src)).graph
    shapes = {w.name: numpy_helper.to_array(w).shape for w in graph.initializer}
    narrowing = [n.name for n in graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2
                 and shapes[n.input[1]][0] > shapes[n.input[1]][1]]
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # its "run pre-processing before quantization" hint is not for users
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], per_channel=True,
                         nodes_to_exclude=narrowing)
    finally:
        root.setLevel(level)


def _to_openvino(src: Path, dst: Path, quantize: str) -> None:
    """The ONNX model as OpenVINO IR (float32 weights kept); int8: NNCF's weight compression."""
    import openvino as ov

    ir = ov.Core().read_model(str(src))
    if quantize == "int8":
        from curate.errors import require

        nncf = require("nncf", "embed.quantize: int8 with backend openvino", CPU_FAST)
        ir = nncf.compress_weights(ir, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(ir, str(dst), compress_to_fp16=False)


def open_runtime(folder: Path, backend: str, threads: int):
    """A callable ``feed (name -> int64 array) -> (batch, tokens, hidden) float32`` over the export in ``folder``."""
    import json

    note = json.loads((folder / EXPORT_NOTE).read_text())
    path, names = str(folder / note["file"]), note["inputs"]
    if backend == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return lambda feed: session.run([HIDDEN], {n: feed[n] for n in names})[0]
    import openvino as ov

    # f32 inference: OpenVINO would otherwise choose bf16 on CPUs that have it
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})

    def run(feed):
        request = compiled.create_infer_request()  # one per call: safe from several threads
        request.infer({n: feed[n] for n in names})
        return request.get_output_tensor(0).data.copy()

    return run
