"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests: canned answers,
scripted faults (429 with Retry-After, 500, a reply slower than the client's timeout) and one
malformed answer, so the real `openai` client code path runs without a network."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubLLM:
    def __init__(self, key: str, faults: list[str] = (), malformed_at: int | None = None,
                 slow_seconds: float = 1.0):
        self.key, self.faults, self.malformed_at = key, list(faults), malformed_at
        self.slow_seconds = slow_seconds
        self.prompts: list[str] = []  # every request's user prompt, retries included
        self.seen: dict[str, int] = {}  # distinct prompts in order of arrival (from 1)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client gave up waiting
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StubLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, headers, body: dict) -> tuple[int, dict, dict]:
        if headers.get("Authorization") != f"Bearer {self.key}":
            return 401, {}, {"error": {"message": "bad key"}}
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.prompts.append(prompt)
            fault = self.faults.pop(0) if self.faults else None
            self.seen.setdefault(prompt, len(self.seen) + 1)
            malformed = fault is None and self.seen[prompt] == self.malformed_at
            if malformed:
                self.malformed_at = None  # once: asking again gets a good answer
        if fault == "429":
            return 429, {"retry-after-ms": "20"}, {"error": {"message": "slow down"}}
        if fault == "500":
            return 500, {}, {"error": {"message": "internal"}}
        if fault == "slow":
            time.sleep(self.slow_seconds)
        if malformed:
            return 200, {}, {"id": "bad", "object": "chat.completion", "choices": []}
        text = (f"This person enjoys places like those listed ({len(prompt)} characters of "
                "history), and asks to be mailed at jane.doe@example.com.")
        return 200, {}, {
            "id": "ok", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                status, headers, payload = stub.answer(self.headers, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        return Handler
