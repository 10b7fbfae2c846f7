"""embed.backend onnx / openvino and embed.quantize int8: vectors close to torch fp32 on real rows, the export
written once and reused, and store keys that change only when the backend does (issue 24, item 3)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from curate.embed import build_embedder, embed_text
from curate.embed.base import EmbedContext
from curate.embed.sentence_transformer import EXPORT_NOTE, SentenceTransformerEmbedder
from curate.embed.spec import EmbedSpec
from curate.models import evict
from tests.conftest import SAMPLE
from tests.scale_rows import alpaca_rows

RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino"}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """16 real alpaca-gpt4 rows as the conversation text the embed stage gives the model."""
    out = []
    for r in alpaca_rows([SAMPLE / "alpaca_gpt4_en.json"])[:16]:
        prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        out.append(embed_text({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]},
                              "conversation"))
    return out


@pytest.fixture(scope="module")
def fp32(texts) -> np.ndarray:
    return build_embedder(EmbedSpec(backend="torch"), torch_threads=2).embed(texts)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A curate cache of this module's own (exports are kept under ``$CURATE_CACHE_DIR/embed-models``)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CURATE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def embedder(**spec) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder("embed", EmbedSpec(**spec), EmbedContext(torch_threads=2))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("backend,quantize,floor", [("onnx", "none", 0.9999), ("onnx", "int8", 0.99), ("openvino", "none", 0.9999),
                                                   ("openvino", "int8", 0.99)])
def test_backend_vectors_match_torch_fp32(texts, fp32, cache, backend, quantize, floor):
    pytest.importorskip(RUNTIME[backend])
    emb = embedder(backend=backend, quantize=quantize)
    got = emb.embed(texts)
    assert got.shape == fp32.shape == (16, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised as the torch path is
    cos = cosines(got, fp32)
    assert cos.min() >= floor, f"{backend}/{quantize}: row {int(cos.argmin())} has cosine {cos.min():.4f} to torch fp32"
    if quantize == "int8":
        assert not np.array_equal(got, fp32)  # the quantised model really ran
    assert [p.name for p in emb.export_dir().parent.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_export_is_written_once_and_reused(texts, cache, monkeypatch):
    pytest.importorskip("onnxruntime")
    import curate.embed.sentence_transformer as st

    first = embedder(backend="onnx", quantize="int8")
    a = first.embed(texts[:4])
    folder = first.export_dir()
    files = sorted(folder.iterdir())
    assert (folder / EXPORT_NOTE).exists() and (folder / "model.onnx").exists()
    before = folder.stat().st_ino, {f.name: f.stat().st_mtime_ns for f in files}
    evict(str(folder))  # drop the process's open session: the second embedder opens the folder again

    def exported_again(*args, **kwargs):
        raise AssertionError("the model was exported a second time")

    monkeypatch.setattr(st, "export_model", exported_again)
    second = embedder(backend="onnx", quantize="int8")
    b = second.embed(texts[:4])
    assert second.export_dir() == folder
    assert (folder.stat().st_ino, {f.name: f.stat().st_mtime_ns for f in sorted(folder.iterdir())}) == before  # not exported again
    np.testing.assert_array_equal(a, b)
    monkeypatch.undo()
    assert embedder(backend="onnx").export_dir() != folder  # fp32 is another export


def test_a_half_written_folder_is_replaced(texts, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from curate.embed.export import export_folder

    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path))
    emb = embedder(backend="onnx")
    target = export_folder(emb.export_key())
    assert target.is_relative_to(tmp_path)
    target.mkdir(parents=True)
    (target / "model.onnx").write_bytes(b"half a model")  # no export note: not a finished export
    vecs = emb.embed(texts[:2])
    assert (target / EXPORT_NOTE).exists() and (target / "model.onnx").stat().st_size > 1_000_000
    assert np.isfinite(vecs).all()


def test_backend_enters_the_key_only_when_not_torch(monkeypatch):
    """torch keeps the keys every flow had (no backend entry); ``auto`` (the default) is openvino where it is installed,
    keyed as an explicit openvino, and torch where it is not, keyed as an explicit torch, each with its reason."""
    from curate.lm import base

    torch_emb = build_embedder(EmbedSpec(backend="torch"))
    fp = torch_emb.fingerprint()
    assert "backend" not in fp and "quantize" not in fp  # every torch flow keeps its store key
    monkeypatch.setattr(base, "openvino_installed", lambda: True)
    auto = build_embedder(EmbedSpec())
    assert auto.spec.backend == "openvino" and "openvino installed" in auto.backend_reason
    assert auto.key == build_embedder(EmbedSpec(backend="openvino")).key != torch_emb.key
    monkeypatch.setattr(base, "openvino_installed", lambda: False)
    absent = build_embedder(EmbedSpec())
    assert absent.spec.backend == "torch" and "not installed" in absent.backend_reason and absent.key == torch_emb.key
    assert build_embedder(EmbedSpec(dtype="float16", device="cpu")).spec.backend == "torch"
    onnx = build_embedder(EmbedSpec(backend="onnx")).fingerprint()
    int8 = build_embedder(EmbedSpec(backend="onnx", quantize="int8")).fingerprint()
    ov8 = build_embedder(EmbedSpec(backend="openvino", quantize="int8")).fingerprint()
    assert onnx == {**fp, "backend": "onnx"}
    assert int8["backend"] == "onnx" and int8["quantize"].startswith("int8:") and ov8["quantize"].startswith("int8:")
    specs = ({"backend": "torch"}, {"backend": "onnx"}, {"backend": "onnx", "quantize": "int8"}, {"backend": "openvino"},
             {"backend": "openvino", "quantize": "int8"})
    keys = {build_embedder(EmbedSpec(**kw)).key for kw in specs}
    assert len(keys) == 5


@pytest.mark.parametrize("spec,message", [
    ({"quantize": "int8"}, "needs embed.backend onnx or openvino"),
    ({"backend": "onnx", "device": "cuda"}, "runs on the CPU"),
    ({"backend": "openvino", "dtype": "bfloat16"}, "needs backend torch"),
    ({"backend": "onnx", "method": "precomputed"}, "is for method sentence_transformers"),
])
def test_impossible_combinations_are_refused(spec, message):
    with pytest.raises(ValidationError, match=message):
        EmbedSpec(**spec)


def test_no_texts_embed_to_no_vectors_without_an_export(cache, monkeypatch):
    """An empty batch (a shard whose rows are all stored or quarantined) gives a (0, dim) array and exports nothing."""
    import curate.embed.sentence_transformer as st

    def exported(*args, **kwargs):
        raise AssertionError("exported for no texts")

    monkeypatch.setattr(st, "export_model", exported)
    got = embedder(backend="openvino", quantize="int8").embed([])
    assert got.shape == (0, 384) and got.dtype == np.float32


def test_auto_picks_torch_where_the_export_is_not_for_the_model(tmp_path, monkeypatch):
    """``auto`` takes openvino only for a local or bundled model whose first module is a Transformer, without a default
    prompt or its own code; anything else (and a hub model, whose files are not read ahead) stays on torch."""
    import json

    from curate.embed.sentence_transformer import resolve_backend
    from curate.lm import base
    from curate.models import ResolvedModel

    monkeypatch.setattr(base, "openvino_installed", lambda: True)

    def folder(name, modules, st_config=None):
        d = tmp_path / name
        d.mkdir()
        (d / "modules.json").write_text(json.dumps(modules))
        if st_config is not None:
            (d / "config_sentence_transformers.json").write_text(json.dumps(st_config))
        return ResolvedModel(name, str(d), "r", "local")

    transformer = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    assert resolve_backend(EmbedSpec(), folder("plain", transformer))[0] == "openvino"
    assert resolve_backend(EmbedSpec(), folder("static", [{"type": "sentence_transformers.models.StaticEmbedding"}]))[0] == "torch"
    prompt = resolve_backend(EmbedSpec(), folder("prompted", transformer, {"default_prompt_name": "query"}))
    assert prompt[0] == "torch" and "default prompt" in prompt[1]
    assert resolve_backend(EmbedSpec(trust_remote_code=True), folder("own-code", transformer))[0] == "torch"
    assert resolve_backend(EmbedSpec(), ResolvedModel("org/model", "org/model", "main", "hub"))[0] == "torch"
    assert resolve_backend(EmbedSpec(device="cuda"), folder("gpu", transformer))[0] == "torch"


def test_the_flow_hash_ignores_the_default_backend(tmp_path):
    """A flow's hash (run summaries, compare cells) is what it was before ``embed.backend`` existed when the backend is
    auto or torch and nothing is quantised; another backend changes it."""
    from conftest import write_flow

    from curate.config import load_flow

    def digest(**embed):
        return load_flow(write_flow(tmp_path / str(len(list(tmp_path.iterdir()))), inputs=[{"path": "r.jsonl"}],
                                    embed={"model": "all-MiniLM-L6-v2", **embed})).fingerprint()

    plain = digest()
    assert digest(backend="torch") == digest(backend="auto", quantize="none") == plain != digest(backend="openvino")


def test_a_worker_that_would_embed_another_way_stops(tmp_path):
    """A shard task whose embedder's key is not the driver's (here: another backend) stops before computing, naming
    the backend it would run and why."""
    from curate.stages.embed import embed_shard

    driver_key = build_embedder(EmbedSpec(backend="torch")).key
    with pytest.raises(RuntimeError, match="embedder key mismatch.*embed.backend 'onnx': set in the flow"):
        embed_shard(None, EmbedSpec(backend="onnx"), driver_key, str(tmp_path))
