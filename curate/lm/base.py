"""The backend contract: one small interface over transformers, vLLM and OpenAI-compatible servers.

Every backend (``hf.py``, ``vllm.py``, ``openai.py``) implements all of it:

- ``name``, ``fingerprint()``: what enters the score key (backend, model id, revision, dtype,
  quantization; the openai backend adds the endpoint and server kind), computed without loading weights;
- ``tokenizer``: the model's tokenizer (spans are found with it, on this side, for every backend);
- ``score(seqs)``: masked token log-probabilities (IFD family, perplexity, DELIFT);
- ``next_token(prompts, candidates)``: the candidate tokens' scores after each prompt, with the
  full-vocabulary log-sum-exp (rating-token judges: deita, SelectIT);
- ``chat(conversations, decoding, seeds, prefix)``: one reply per conversation, rendered with the
  model's chat template, ``{"text", "status", …}`` per row (generative judges: LLM rating, DS2).

``hf`` also offers ``generate(prompt_ids, decoding, seeds)`` (batched greedy generation, per-row seeds
for sampled rows), which its ``chat`` uses.
"""

from __future__ import annotations

from typing import Any, Protocol

from curate.lm.engine import NextToken, Seq, SeqResult


class Backend(Protocol):
    name: str

    @property
    def tokenizer(self) -> Any: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def score(self, seqs: list[Seq], token_logprobs: bool = False, progress=None) -> list[SeqResult]: ...

    def next_token(self, prompts: list[list[int]], candidates: list[int], progress=None) -> list[NextToken]: ...

    def chat(self, conversations: list[list[dict]], decoding: dict[str, Any], seeds: list[int] | None = None, progress=None,
             prefix: str = "") -> list[dict]: ...


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo`` on Linux; empty elsewhere or when unreadable).
    Tests replace this function to pretend a CPU has (or lacks) AMX."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: CPU flags with which oneDNN runs fp32 matmuls in its bf16 math mode (``dtype: bf16-matmul``) in hardware.
BF16_MATH_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_dtype(dtype: str, device: str) -> tuple[str, str]:
    """(dtype, why) for a model on ``device`` (``cpu``, ``cuda``, ``cuda:1``…; ``auto`` is resolved first).

    ``auto``: ``bf16-matmul`` on a CPU with avx512_bf16 or AMX (fp32 weights and activations; oneDNN computes the fp32
    matmuls in its bf16 math mode: fp32's numbers within 2e-5, faster — bench/results/bf16_scoring.md), ``float32``
    on other CPUs, ``bfloat16`` on a CUDA device that supports it. ``bf16-matmul`` asked for on a device or CPU that
    cannot run it raises :class:`~curate.errors.CurateError`; any other value is kept as written."""
    if dtype not in ("auto", "bf16-matmul"):
        return dtype, "set in the flow"
    device = resolve_device(device)  # may import torch: only when the dtype depends on the device
    if dtype == "bf16-matmul":
        from curate.errors import CurateError

        if device != "cpu":
            raise CurateError(f"dtype: bf16-matmul is for CPUs (oneDNN's bf16 math mode); on {device} use bfloat16 or float32")
        if not cpu_flags() & set(BF16_MATH_FLAGS):
            raise CurateError("dtype: bf16-matmul needs a CPU with avx512_bf16 or AMX (amx_bf16); this one has neither: use float32")
        return dtype, "set in the flow"
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: {torch.cuda.get_device_name(torch.device(device))} supports bf16"
        return "float32", "auto: this CUDA device has no bf16 support"
    if device == "cpu":
        have = [f for f in BF16_MATH_FLAGS if f in cpu_flags()]
        if have:
            return "bf16-matmul", f"auto: this CPU has {' and '.join(have)}: fp32 weights, matmuls in oneDNN's bf16 math mode"
        return "float32", "auto: this CPU has neither avx512_bf16 nor AMX (bf16 math would be slower than fp32)"
    return "float32", f"auto: float32 on device {device!r}"


def openvino_installed() -> bool:
    """Whether the ``openvino`` package imports (:func:`curate.errors.importable`: once per process). Tests replace this
    function."""
    from curate.errors import importable

    return importable("openvino")


def resolve_runtime(runtime: str, dtype: str, device: str) -> tuple[str, str]:
    """(runtime, why) for the hf backend's scoring forwards (``torch`` or ``openvino``: :mod:`curate.lm.compiled`).

    ``auto``: ``openvino`` on a CPU when the ``openvino`` package is installed (``curate[cpu-fast]``) and ``dtype`` is
    ``auto`` or ``float32``, else ``torch``. ``openvino`` asked for where it cannot run (not installed, another device,
    a dtype other than float32) raises :class:`~curate.errors.CurateError` naming the fix."""
    from curate.errors import CurateError

    if runtime == "torch":  # before anything imports openvino
        return "torch", "set in the flow"
    if runtime == "openvino":
        if dtype not in ("auto", "float32"):
            raise CurateError(f"runtime: openvino runs the model in float32; dtype {dtype} needs runtime torch")
        if resolve_device(device) != "cpu":
            raise CurateError(f"runtime: openvino runs on the CPU; device {resolve_device(device)!r} needs runtime torch "
                              "(or set device: cpu)")
        if not openvino_installed():
            raise CurateError("runtime: openvino needs the openvino package (it is not installed, or does not import): "
                              "pip install 'curate[cpu-fast]' (or set runtime: torch)")
        return "openvino", "set in the flow"
    if dtype not in ("auto", "float32"):
        return "torch", f"auto: dtype {dtype} runs in torch"
    if resolve_device(device) != "cpu":
        return "torch", "auto: not on a CPU"
    if not openvino_installed():
        return "torch", "auto: openvino is not installed (pip install 'curate[cpu-fast]' for the faster CPU runtime)"
    return "openvino", "auto: on a CPU with openvino installed (curate[cpu-fast])"
