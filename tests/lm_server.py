"""A local OpenAI-compatible completions endpoint over the real SmolLM2, for the openai backend's tests.

Why not the real thing: `vllm serve` needs vLLM, which cannot be installed beside Prefect 3.8 and has
no CPU build for this machine; llama.cpp's server (llama-cpp-python) accepts no token-id prompts and
returns echo log-probs shifted by one position. So the tests serve the real model themselves: the
HTTP protocol is the OpenAI legacy completions format (`echo` + `logprobs`, as vLLM answers it), the
numbers come from a plain full-logits forward of the model — a different code path from curate's
masked-CE engine. It can also answer 429 for the first N requests, to exercise retries.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalCompletionsServer:
    def __init__(self, model, model_name: str = "local-smollm2", fail_first: int = 0):
        self.model = model
        self.model_name = model_name
        self.fail_first = fail_first
        self.requests = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def completions(self, body: dict) -> tuple[int, dict]:
        import torch

        prompt = body.get("prompt")
        if body.get("model") != self.model_name:
            return 404, {"error": {"message": f"model {body.get('model')!r} not found"}}
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)) or not body.get("echo"):
            return 400, {"error": {"message": "this test server takes token-id prompts with echo"}}
        ids = torch.tensor([prompt])
        with self.lock, torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        token_logprobs = [None] + [float(logp[i - 1, t]) for i, t in enumerate(prompt) if i > 0]
        return 200, {"object": "text_completion", "model": self.model_name,
                     "choices": [{"index": 0, "text": "", "logprobs": {"token_logprobs": token_logprobs, "tokens": [str(t) for t in prompt]}}]}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    fail = server.requests <= server.fail_first
                if fail:
                    code, payload = 429, {"error": {"message": "rate limited (test)"}}
                elif self.path == "/v1/completions":
                    code, payload = server.completions(body)
                else:
                    code, payload = 404, {"error": {"message": f"no route {self.path}"}}
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
