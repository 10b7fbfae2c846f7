"""A local OpenAI-compatible completions endpoint over the real SmolLM2, for the openai backend's tests.

Why not the real thing: `vllm serve` needs vLLM, which cannot be installed beside Prefect 3.8 and has
no CPU build for this machine; llama.cpp's server (llama-cpp-python) accepts no token-id prompts and
returns echo log-probs shifted by one position. So the tests serve the real model themselves: the
HTTP protocol is the OpenAI legacy completions format (`echo` + `logprobs`, as vLLM answers it), the
numbers come from a plain full-logits forward of the model — a different code path from curate's
masked-CE engine; chat completions are the model's greedy generations, cut before the first of the
request's ``stop`` strings as the OpenAI API does. Fault injection: 429 for the first N requests
(``fail_first``); the first attempt of every k-th distinct chat request fails with 429 or 500 in turn
(``fail_every``; a retry of the same body then succeeds); 400 for any request whose text contains a
``reject`` marker; 401 for a request without the ``api_key`` (when set); a fixed reply for requests
that contain a ``canned`` marker. Every request body is
kept in ``bodies`` (with its answer's status in ``statuses``); ``strict=True`` answers chat requests
the way a hosted OpenAI API does, with 400 for any field outside its documented chat-completions
fields (vLLM's ``top_k``, ``add_generation_prompt``, ``continue_final_message`` included).

``max_batch`` > 1 turns on dynamic batching, as vLLM's server does: chat requests that arrive while
the model is busy, or together (received while others are still being read, or within
``batch_window_s`` of the first), are generated in one left-padded ``generate`` call of up to
``max_batch`` rows. With ``max_batch=1`` (default) the server
generates one request at a time.

``replicas`` > 1 serves chat requests with that many copies of the model, as a deployment with
several replicas behind one endpoint does: replica 0 is ``model`` itself, the others are deep copies
(no module state is shared between threads); each replica has its own worker thread that takes
requests from one shared queue and batches what it takes (up to ``max_batch`` rows) as above.
Torch releases the GIL inside its kernels, so with one torch thread per replica (the process's
``torch.set_num_threads``) two replicas use two cores. ``batch_replicas`` says which replica made
each ``generate`` call of ``batches``. A client that sends one request at a time keeps one replica
busy at a time. Default ``replicas=1``: one worker, as before.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: request fields of the OpenAI chat-completions API (the ones a strict server accepts)
OPENAI_CHAT_FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "n", "stop",
                      "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias", "user", "stream",
                      "response_format", "tools", "tool_choice"}


class LocalCompletionsServer:
    def __init__(self, model, model_name: str = "local-smollm2", fail_first: int = 0, tokenizer=None, canned: dict[str, str] | None = None,
                 strict: bool = False, fail_every: int = 0, fail_codes: tuple[int, ...] = (429, 500), reject: str | None = None,
                 max_batch: int = 1, batch_window_s: float = 0.005, replicas: int = 1, api_key: str | None = None):
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {replicas}")
        self.model = model
        #: the models that generate chat replies: ``model`` and ``replicas - 1`` deep copies of it
        self.replicas = [model] + [copy.deepcopy(model) for _ in range(replicas - 1)]
        self.strict = strict
        self.api_key = api_key  # when set, a request without "Authorization: Bearer <api_key>" is answered 401, as a hosted API does
        self.bodies: list[dict] = []  # every request body received, in arrival order
        self.statuses: list[int | None] = []  # the HTTP status answered to each of them (None: not yet answered)
        self.fail_every, self.fail_codes, self.reject = fail_every, fail_codes, reject
        self.seen: dict[str, int] = {}  # distinct chat bodies -> requests received for it
        self.max_batch, self.batch_window_s = max_batch, batch_window_s
        self.batches: list[int] = []  # rows per generate call (dynamic batching)
        self.batch_replicas: list[int] = []  # the replica that made each of those calls
        self._queue: queue.Queue = queue.Queue()
        self._workers: list[threading.Thread] = []
        self.arriving = 0  # requests received and not yet queued for generation (or answered)
        self._local = threading.local()
        self.tokenizer = tokenizer
        self.canned = canned or {}  # fault injection: a reply for any request whose text contains the key
        self.model_name = model_name
        self.fail_first = fail_first
        self.requests = 0
        self.lock = threading.Lock()  # the request log
        self.model_lock = threading.Lock()  # one forward or generate at a time (on ``model``, replica 0)
        self.replica_locks = [self.model_lock] + [threading.Lock() for _ in self.replicas[1:]]
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        if self.max_batch > 1 or len(self.replicas) > 1:
            self._workers = [threading.Thread(target=self._batch_loop, args=(r,), daemon=True) for r in range(len(self.replicas))]
            for w in self._workers:
                w.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        for _ in self._workers:
            self._queue.put(None)  # one stop mark per worker
        for w in self._workers:
            w.join()

    # -- generation -------------------------------------------------------------------------------
    def _generate(self, rows: list[list[int]], max_tokens: list[int], replica: int = 0) -> list[tuple[str, int]]:
        """Greedy continuations of token-id rows in one left-padded ``generate`` call of one replica:
        (text, new tokens) per row, each ending at its first EOS or its own ``max_tokens``."""
        import torch

        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        with self.replica_locks[replica], torch.inference_mode():
            with self.lock:
                self.batches.append(len(rows))
                self.batch_replicas.append(replica)
            out = self.replicas[replica].generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(max_tokens), do_sample=False,
                                                  temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                                                  eos_token_id=self.tokenizer.eos_token_id)
        res = []
        for new, cap in zip(out[:, width:].tolist(), max_tokens):
            new = new[:cap]
            end = next((j + 1 for j, t in enumerate(new) if t == self.tokenizer.eos_token_id), len(new))
            res.append((self.tokenizer.decode(new[:end], skip_special_tokens=True), end))
        return res

    def _batch_loop(self, replica: int = 0) -> None:
        """Dynamic batching, one loop per replica: take what is waiting (up to ``max_batch`` rows, waiting
        ``batch_window_s`` for more after the first) and generate it in one call of this replica. Idle
        replicas take from the same queue, so requests that arrive together are shared between them."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            items, until = [first], time.monotonic() + self.batch_window_s
            while len(items) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=0.002)
                except queue.Empty:
                    with self.lock:
                        arriving = self.arriving
                    now = time.monotonic()
                    if (arriving == 0 and now >= until) or now >= until + 1.0:  # a slow arrival holds a batch 1 s at most
                        break
                    continue
                if nxt is None:
                    self._queue.put(None)
                    break
                items.append(nxt)
            try:
                for item, res in zip(items, self._generate([i["ids"] for i in items], [i["max_tokens"] for i in items], replica)):
                    item["result"] = res
            except Exception as exc:  # noqa: BLE001 - every waiting request answers 500
                for item in items:
                    item["result"] = exc
            for item in items:
                item["done"].set()

    def generate_one(self, ids: list[int], max_tokens: int) -> tuple[str, int]:
        if not self._workers:
            return self._generate([ids], [max_tokens])[0]
        item = {"ids": ids, "max_tokens": max_tokens, "done": threading.Event()}
        with self.lock:
            self._queue.put(item)
            self.arriving -= 1
            self._local.counted = False
        item["done"].wait()
        if isinstance(item["result"], Exception):
            raise item["result"]
        return item["result"]

    def completions(self, body: dict) -> tuple[int, dict]:
        import torch

        prompt = body.get("prompt")
        if body.get("model") != self.model_name:
            return 404, {"error": {"message": f"model {body.get('model')!r} not found"}}
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)) or not body.get("echo"):
            return 400, {"error": {"message": "this test server takes token-id prompts with echo"}}
        ids = torch.tensor([prompt])
        with self.model_lock, torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        token_logprobs = [None] + [float(logp[i - 1, t]) for i, t in enumerate(prompt) if i > 0]
        return 200, {"object": "text_completion", "model": self.model_name,
                     "choices": [{"index": 0, "text": "", "logprobs": {"token_logprobs": token_logprobs, "tokens": [str(t) for t in prompt]}}]}

    def chat(self, body: dict) -> tuple[int, dict]:
        """Greedy chat completion with the real model; ``continue_final_message`` as vLLM does it."""

        if body.get("model") != self.model_name:
            return 404, {"error": {"message": f"model {body.get('model')!r} not found"}}
        unknown = sorted(set(body) - OPENAI_CHAT_FIELDS)
        if self.strict and unknown:
            return 400, {"error": {"message": f"Unrecognized request argument supplied: {', '.join(unknown)}"}}
        messages = body["messages"]
        flat = json.dumps(messages)
        for marker, reply in self.canned.items():
            if marker in flat:
                return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}
        cont = bool(body.get("continue_final_message"))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        reply, n_new = self.generate_one(ids, int(body.get("max_tokens", 32)))
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        cut = min((i for i in (reply.find(s) for s in stop if s) if i >= 0), default=-1)
        finish = "length" if n_new >= int(body.get("max_tokens", 32)) else "stop"
        if cut >= 0:
            reply, finish = reply[:cut], "stop"
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": finish}],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": n_new}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                with server.lock:
                    server.arriving += 1
                server._local.counted = True
                try:
                    self.answer()
                finally:
                    if server._local.counted:
                        with server.lock:
                            server.arriving -= 1

            def answer(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.bodies.append(body)
                    server.statuses.append(None)
                    index = len(server.bodies) - 1
                    fail = 429 if server.requests <= server.fail_first else None
                    if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                        fail = 401
                    if server.reject and server.reject in json.dumps(body):
                        fail = 400
                    elif self.path == "/v1/chat/completions" and fail is None:
                        key = json.dumps(body, sort_keys=True)
                        server.seen[key] = server.seen.get(key, 0) + 1
                        n = len(server.seen)  # this body is the n-th distinct one
                        if server.fail_every and server.seen[key] == 1 and n % server.fail_every == 0:
                            fail = server.fail_codes[(n // server.fail_every - 1) % len(server.fail_codes)]
                if fail is not None:
                    code, payload = fail, {"error": {"message": f"injected HTTP {fail} (test)"}}
                elif self.path == "/v1/completions":
                    code, payload = server.completions(body)
                elif self.path == "/v1/chat/completions":
                    code, payload = server.chat(body)
                else:
                    code, payload = 404, {"error": {"message": f"no route {self.path}"}}
                with server.lock:
                    server.statuses[index] = code
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
