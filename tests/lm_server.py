"""A local OpenAI-compatible completions endpoint over the real SmolLM2, for the openai backend's tests.

Why not the real thing: `vllm serve` needs vLLM, which cannot be installed beside Prefect 3.8 and has
no CPU build for this machine; llama.cpp's server (llama-cpp-python) accepts no token-id prompts and
returns echo log-probs shifted by one position. So the tests serve the real model themselves: the
HTTP protocol is the OpenAI legacy completions format (`echo` + `logprobs`, as vLLM answers it), the
numbers come from a plain full-logits forward of the model — a different code path from curate's
masked-CE engine; chat completions are the model's greedy generations. It can also answer 429 for
the first N requests, and a fixed reply to requests that contain a marker (fault injection). Every
request body is kept in ``bodies``; ``strict=True`` answers chat requests the way a hosted OpenAI API
does, with 400 for any field outside its documented chat-completions fields (vLLM's ``top_k``,
``add_generation_prompt``, ``continue_final_message`` included).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: request fields of the OpenAI chat-completions API (the ones a strict server accepts)
OPENAI_CHAT_FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "n", "stop",
                      "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias", "user", "stream",
                      "response_format", "tools", "tool_choice"}


class LocalCompletionsServer:
    def __init__(self, model, model_name: str = "local-smollm2", fail_first: int = 0, tokenizer=None, canned: dict[str, str] | None = None,
                 strict: bool = False):
        self.model = model
        self.strict = strict
        self.bodies: list[dict] = []  # every request body received, in arrival order
        self.tokenizer = tokenizer
        self.canned = canned or {}  # fault injection: a reply for any request whose text contains the key
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

    def chat(self, body: dict) -> tuple[int, dict]:
        """Greedy chat completion with the real model; ``continue_final_message`` as vLLM does it."""
        import torch

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
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        with self.lock, torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(body.get("max_tokens", 32)),
                                      do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
        reply = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}],
                     "usage": {"completion_tokens": int(out.shape[1] - ids.shape[1])}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.bodies.append(body)
                    fail = server.requests <= server.fail_first
                if fail:
                    code, payload = 429, {"error": {"message": "rate limited (test)"}}
                elif self.path == "/v1/completions":
                    code, payload = server.completions(body)
                elif self.path == "/v1/chat/completions":
                    code, payload = server.chat(body)
                else:
                    code, payload = 404, {"error": {"message": f"no route {self.path}"}}
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
