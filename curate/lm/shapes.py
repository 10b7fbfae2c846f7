"""Declared output shapes (``decoding.constrain``) as each backend asks for them, and a check of a reply
against its shape.

A shape (:data:`curate.prompts.SHAPES`) is ``{"type": "regex", "pattern": ...}`` (the whole reply) or
``{"type": "json_schema", "schema": ...}``. ``hf`` compiles it with xgrammar (:mod:`curate.lm.hf`);
``vllm`` sends it as structured outputs (:func:`sampling_constraint`); the ``openai`` backend as
``response_format`` / vLLM's ``structured_outputs`` (:func:`request_fields`) and records whether the
reply has the shape (:func:`conforms`): a server that ignores the field is not taken at its word.
"""

from __future__ import annotations

import json
import re
from typing import Any

from curate.errors import CurateError

#: JSON-schema keywords outside the strict subset of hosted OpenAI-style APIs (the parsers check them anyway)
BOUND_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern")


def check(shape: dict[str, Any]) -> str:
    """The shape's type, or a :class:`CurateError` for an unknown one."""
    kind = shape.get("type")
    if kind not in ("regex", "json_schema"):
        raise CurateError(f"unknown output shape type {kind!r} (regex | json_schema)")
    return kind


def structured_outputs(shape: dict[str, Any] | None) -> dict[str, Any] | None:
    """vLLM's structured-output request for a shape: ``{"regex": pattern}`` or ``{"json": schema}`` (the
    keywords of ``StructuredOutputsParams`` and of a ``vllm serve`` request's ``structured_outputs``)."""
    if shape is None:
        return None
    return {"regex": shape["pattern"]} if check(shape) == "regex" else {"json": shape["schema"]}


def sampling_constraint(sampling_params: Any, shape: dict[str, Any]) -> dict[str, Any]:
    """The ``SamplingParams`` keyword that enforces ``shape``, built with the module
    ``vllm.sampling_params``: ``structured_outputs=StructuredOutputsParams(...)`` (vLLM 0.10.2 on, the
    only form from 0.12), else ``guided_decoding=GuidedDecodingParams(...)`` (older vLLM)."""
    so = structured_outputs(shape)
    if hasattr(sampling_params, "StructuredOutputsParams"):
        return {"structured_outputs": sampling_params.StructuredOutputsParams(**so)}
    if hasattr(sampling_params, "GuidedDecodingParams"):
        return {"guided_decoding": sampling_params.GuidedDecodingParams(**so)}
    raise CurateError("this vLLM has no structured outputs (StructuredOutputsParams / GuidedDecodingParams): upgrade vLLM "
                      "or turn decoding.constrain off")


def portable_schema(schema: Any) -> Any:
    """``schema`` without :data:`BOUND_KEYWORDS` (at any depth)."""
    if isinstance(schema, dict):
        return {k: portable_schema(v) for k, v in schema.items() if k not in BOUND_KEYWORDS}
    if isinstance(schema, list):
        return [portable_schema(v) for v in schema]
    return schema


def request_fields(shape: dict[str, Any] | None, server: str) -> dict[str, Any] | None:
    """The chat-completions request fields that ask a server to enforce ``shape``, or None where it has
    no way: a JSON schema goes as ``response_format`` (``json_schema``, ``strict``; to ``server: openai``
    in the hosted APIs' strict subset, :func:`portable_schema`); a regex only to ``server: vllm``
    (``structured_outputs``)."""
    if shape is None:
        return None
    if check(shape) == "json_schema":
        schema = shape["schema"] if server == "vllm" else portable_schema(shape["schema"])
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}}
    return {"structured_outputs": {"regex": shape["pattern"]}} if server == "vllm" else None


def conforms(shape: dict[str, Any], text: str | None) -> bool:
    """Whether ``text`` has the shape: the regex matches all of it; or it is one JSON object with the
    schema's required keys (no others where ``additionalProperties`` is false), each integer, number or
    string property of its type and within its ``minimum``/``maximum``/``minLength``/``maxLength``
    (the flat objects of :data:`curate.prompts.SHAPES`; nested schemas are not checked deeper)."""
    if text is None:
        return False
    if check(shape) == "regex":
        return re.fullmatch(shape["pattern"], text, re.S) is not None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    schema = shape["schema"]
    if not isinstance(obj, dict) or any(k not in obj for k in schema.get("required", [])):
        return False
    props = schema.get("properties", {})
    if schema.get("additionalProperties") is False and any(k not in props for k in obj):
        return False
    for k, spec in props.items():
        if k in obj and not _value_ok(obj[k], spec):
            return False
    return True


def _value_ok(v: Any, spec: dict[str, Any]) -> bool:
    kind = spec.get("type")
    if kind in ("integer", "number"):
        if isinstance(v, bool) or not isinstance(v, int if kind == "integer" else (int, float)):
            return False
        return spec.get("minimum", v) <= v <= spec.get("maximum", v)
    if kind == "string":
        return isinstance(v, str) and spec.get("minLength", 0) <= len(v) <= spec.get("maxLength", len(v))
    return True
