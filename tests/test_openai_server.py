"""The openai backend sends vLLM's request extensions only to a server declared ``server: vllm``
(checked on the request bodies the local stand-in server receives)."""

from __future__ import annotations

import logging

import pytest
from lm_server import LocalCompletionsServer

from curate.errors import CurateError
from curate.lm import LMParams, load_backend

CONV = [[{"role": "user", "content": "Rate this answer from 1 to 5: 'Paris is the capital of France.'"}]]
DECODING = {"temperature": 0.0, "top_p": 1.0, "top_k": 50, "max_tokens": 4}
EXTENSIONS = {"top_k", "add_generation_prompt", "continue_final_message"}


@pytest.fixture(scope="module")
def local_model():
    backend = load_backend(LMParams(), torch_threads=2)
    return backend.model, backend.tokenizer


def api(server, kind: str):
    return load_backend(LMParams(backend="openai", base_url=server.base_url, served_name="local-smollm2", server=kind))


def test_plain_openai_server_gets_no_vllm_extensions(local_model, caplog):
    model, tok = local_model
    with LocalCompletionsServer(model, tokenizer=tok, strict=True) as server:  # answers 400 to unknown fields, as a hosted API
        backend = api(server, "openai")
        with caplog.at_level(logging.WARNING, logger="curate"):
            out = backend.chat(CONV, DECODING, seeds=[7])
        assert out[0]["status"] == "ok", out[0]
        (body,) = server.bodies
        assert not EXTENSIONS & set(body)
        assert body["temperature"] == 0.0 and body["top_p"] == 1.0 and body["max_tokens"] == 4 and body["seed"] == 7
        assert "top_k=50 is a vLLM extension and is not sent" in caplog.text
        with pytest.raises(CurateError, match="set server: vllm"):  # a prefix cannot be continued by the plain API
            backend.chat(CONV, DECODING, prefix="Score:")
        assert len(server.bodies) == 1  # refused before anything was sent
        assert backend.fingerprint()["server"] == "openai"


def test_vllm_server_gets_top_k_and_prefix_continuation(local_model):
    model, tok = local_model
    with LocalCompletionsServer(model, tokenizer=tok) as server:
        backend = api(server, "vllm")
        plain, prefixed = backend.chat(CONV, DECODING)[0], backend.chat(CONV, DECODING, prefix="Score:")[0]
        assert plain["status"] == prefixed["status"] == "ok" and prefixed["text"].startswith("Score:")
        first, second = server.bodies
        assert first["top_k"] == 50 and not {"add_generation_prompt", "continue_final_message"} & set(first)
        assert second["top_k"] == 50 and second["add_generation_prompt"] is False and second["continue_final_message"] is True
        assert second["messages"][-1] == {"role": "assistant", "content": "Score:"}
        assert backend.fingerprint()["server"] == "vllm"
    with LocalCompletionsServer(model, tokenizer=tok, strict=True) as strict:  # the stand-in's strict mode does refuse them
        assert api(strict, "vllm").chat(CONV, DECODING)[0]["status"] == "error"
