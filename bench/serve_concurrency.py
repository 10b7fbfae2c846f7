"""Requests in flight vs one at a time against a real OpenAI-compatible server (issue 20, item 13).

    .venv/bin/python bench/serve_concurrency.py [--prompts 16] [--max-tokens 32] [--concurrency 1 8 16] [--repeats 2] [--threads 1]

The server is ``transformers serve`` on 127.0.0.1 serving the bundled SmolLM2-135M-Instruct (the
de-quantised fp32 directory curate's model resolver makes), offline, started twice: with
``--continuous-batching`` (paged KV cache, sized by flags: 32 pages of 256 tokens, 2048 tokens per
step; left to itself on CPU it takes 90% of free RAM) and without it (one ``generate`` call per
request), each with its torch on each of ``--threads`` threads (``OMP_NUM_THREADS``: on a machine whose
cores other processes also use, two threads that wait for each other at every operation can be
several times slower than one). The client is curate's own openai backend (``backend.chat``, ``concurrency`` requests in
flight, no reply cache) sending ``--prompts`` distinct story prompts, greedy, ``max_tokens`` fixed, so
most replies run to the limit. Each case keeps its best of ``--repeats`` runs (the cases alternate),
after one warm-up request. Reported: generated tokens per wall second (from the server's ``usage``),
the server's CPU seconds (its process tree, read from /proc) per generated token, and the ratio to
the same server's one-at-a-time run and to the best one-at-a-time run of either server, and how many
greedy replies equal the same server's one-at-a-time replies. The CPU
flags and the load average are printed with the table (other processes share the cores here).
Results: bench/results/serve_concurrency.md (copied into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from common import write_result  # noqa: E402

TOPICS = ["a robot", "a lighthouse", "a dragon", "a baker", "a lost key", "a storm", "a violin", "a train", "a comet", "a garden",
          "a clockmaker", "a fox", "a glacier", "a library", "a pirate", "a snail", "a volcano", "a kite", "a submarine", "an owl"]
CB_FLAGS = ["--continuous-batching", "--cb-num-blocks", "32", "--cb-max-batch-tokens", "2048"]


def cpu_flags() -> str:
    """The vector-extension flags of this CPU (the ones that decide CPU matmul speed)."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "fma", "f16c", "sse4_2")
    have = set(line.split(":", 1)[1].split())
    return " ".join(f for f in wanted if f in have)


def cpu_model() -> str:
    try:
        return next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (the server spawns its model's process)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


@contextmanager
def serve(model_dir: str, flags: list[str], log: Path, threads: int):
    """``transformers serve`` on a free 127.0.0.1 port, its torch using ``threads`` threads, until the
    block ends; yields (base_url, pid)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        probe = {"model": model_dir, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start: {' '.join(cmd)}\n{log.read_text(errors='replace')[-4000:]}")
            try:
                if httpx.post(f"{base_url}/chat/completions", json=probe, timeout=60).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield base_url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_case(base_url: str, pid: int, model_dir: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    from curate.lm import LMParams, load_backend

    backend = load_backend(LMParams(backend="openai", base_url=base_url, served_name=model_dir, concurrency=concurrency, timeout_s=600))
    convs = [[{"role": "user", "content": p}] for p in prompts]
    cpu0, t0 = tree_cpu_seconds(pid), time.perf_counter()
    rows = backend.chat(convs, {"temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens})
    wall, cpu = time.perf_counter() - t0, tree_cpu_seconds(pid) - cpu0
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[0]}")
    tokens = sum(int(r["n_tokens"]) for r in rows)
    return {"wall": wall, "cpu": cpu, "tokens": tokens, "length": sum(r.get("finish_reason") == "length" for r in rows),
            "texts": [r["text"] for r in rows]}


def write_table(args, servers: list, results: dict, load0: float) -> None:
    load1 = os.getloadavg()[0]
    seq = {label: results[(label, 1)] for label, _, _ in servers if (label, 1) in results}
    best_seq = max((r["tokens"] / r["wall"] for r in seq.values()), default=None)
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), CPU flags: {cpu_flags()}; "
             f"load average {load0:.2f} at the start, {load1:.2f} at the end. Server: `transformers serve` "
             f"(transformers {__import__('transformers').__version__}, torch {__import__('torch').__version__}) on the bundled "
             f"SmolLM2-135M-Instruct, fp32, CPU. Client: curate's openai backend. {args.prompts} distinct prompts, greedy, "
             f"max_tokens {args.max_tokens}; best of {args.repeats} runs per case.", "",
             "| server | requests in flight | generated tokens | replies cut at max_tokens | wall s | tokens/s | server CPU s per token "
             "| vs one at a time (same server) | vs best one at a time | texts as one at a time (same server) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, _, _ in servers:
        base = seq.get(label)
        for c in args.concurrency:
            r = results.get((label, c))
            if r is None:  # not measured (yet)
                continue
            rate = r["tokens"] / r["wall"]
            same = f"{rate / (base['tokens'] / base['wall']):.2f}×" if base else "–"
            vs_best = f"{rate / best_seq:.2f}×" if best_seq else "–"
            same_texts = f"{sum(a == b for a, b in zip(r['texts'], base['texts']))}/{args.prompts}" if base else "–"
            lines.append(f"| {label} | {c} | {r['tokens']} | {r['length']}/{args.prompts} | {r['wall']:.1f} | {rate:.1f} | "
                         f"{r['cpu'] / max(r['tokens'], 1) * 1000:.0f} ms | {same} | {vs_best} | {same_texts} |")
    write_result("serve_concurrency", "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="the server's torch threads (OMP_NUM_THREADS), one server each")
    ap.add_argument("--no-plain", action="store_true", help="skip the server without continuous batching")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still stops its server
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from curate.models import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct").location
    prompts = [f"Write a story about {TOPICS[i % len(TOPICS)]}." + (f" Part {i // len(TOPICS) + 1}." if i >= len(TOPICS) else "")
               for i in range(args.prompts)]
    kinds = [("continuous batching", CB_FLAGS)] + ([] if args.no_plain else [("no batching (generate per request)", [])])
    servers = [(f"{kind}, {t} thread{'s' if t > 1 else ''}", flags, t) for t in args.threads for kind, flags in kinds]
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="curate-bench-serve-"))
    results: dict[tuple[str, int], dict] = {}
    for label, flags, threads in servers:
        with serve(model_dir, flags, tmp / f"serve-{len(results)}.log", threads) as (base_url, pid):
            for _ in range(args.repeats):
                for c in args.concurrency:
                    r = run_case(base_url, pid, model_dir, prompts, args.max_tokens, c)
                    best = results.get((label, c))
                    if best is None or r["wall"] < best["wall"]:
                        results[(label, c)] = r
                    print(f"{label}, concurrency {c}: {r['tokens']} tokens in {r['wall']:.1f} s ({r['tokens'] / r['wall']:.1f}/s), "
                          f"server CPU {r['cpu']:.1f} s", file=sys.stderr, flush=True)
        write_table(args, servers, results, load0)  # after each server: a stopped run keeps what it measured


if __name__ == "__main__":
    main()
