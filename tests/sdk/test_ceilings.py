"""Per-call ceilings and windowed caps through the official OpenAI and Anthropic Python SDKs
(issue 13), against the real `till serve` binary.

A request above a key's output-token ceiling must surface in the SDK as a clear 4xx error
after exactly ONE HTTP attempt (Till answers `x-should-retry: false`), never as a retry
loop, and must reach neither the ledger (nothing charged) nor the upstream. A windowed cap
answers 429 `rate_limited` with `Retry-After`; the SDKs retry that one by design, and the
retry is free (nothing is charged for a refused call).

Run: target/test-venv/bin/python -m pytest tests/sdk (tests/run.sh does, after building
till-cli and installing tests/sdk/requirements.txt). TILL_BIN overrides the binary.
"""

import json
import os
import queue
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anthropic
import httpx2 as httpx  # the HTTP client these SDK versions are built on
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
TILL = Path(os.environ.get("TILL_BIN") or TARGET / "debug" / "till")


class Upstream:
    """A loopback OpenAI- and Anthropic-shaped upstream that counts what reaches it."""

    def __init__(self):
        self.hits = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.hits.append((self.path, json.loads(body or b"{}")))
                if self.path.endswith("/messages"):
                    answer = {
                        "id": "msg_1", "type": "message", "role": "assistant",
                        "model": "claude-x", "content": [{"type": "text", "text": "hi"}],
                        "stop_reason": "end_turn", "stop_sequence": None,
                        "usage": {"input_tokens": 1, "output_tokens": 1},
                    }
                else:
                    answer = {
                        "id": "c1", "object": "chat.completion", "created": 1,
                        "model": "gpt-x",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "hi"}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                  "total_tokens": 2},
                    }
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


class Till:
    def __init__(self, tmp, upstream):
        self.dir = tmp / "data"
        self.log = open(tmp / "serve.log", "wb")
        self.run("keygen")
        config = tmp / "till.toml"
        config.write_text(
            f'[upstreams.openai]\nbase_url = "http://127.0.0.1:{upstream.port}"\n'
            'credential_env = "TILL_SDK_SECRET"\n'
            f'[upstreams.anthropic]\nbase_url = "http://127.0.0.1:{upstream.port}"\n'
            'credential_env = "TILL_SDK_SECRET"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env.pop("TILL_CONFIG", None)
        env["TILL_SDK_SECRET"] = "sk-real-secret"
        self.proc = subprocess.Popen(
            [str(TILL), "--dir", str(self.dir), "serve", "--config", str(config),
             "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=self.log, env=env, text=True,
        )
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in self.proc.stdout],
                         daemon=True).start()
        end = time.monotonic() + 30
        self.url = None
        while self.url is None and time.monotonic() < end:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("listening on "):
                self.url = line[len("listening on "):].strip()
        if self.url is None:
            self.close()
            raise RuntimeError("till serve did not start: " + (tmp / "serve.log").read_text())

    def run(self, *args):
        out = subprocess.run([str(TILL), "--dir", str(self.dir), *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def env():
    tmp = Path(tempfile.mkdtemp(prefix="till-sdk-"))
    upstream = Upstream()
    till = Till(tmp, upstream)
    try:
        yield till, upstream
    finally:
        till.close()
        upstream.close()


class Attempts:
    """An httpx client that counts every HTTP attempt the SDK makes."""

    def __init__(self):
        self.n = 0
        self.client = httpx.Client(event_hooks={"request": [self.count]})

    def count(self, _request):
        self.n += 1


def test_openai_sdk_ceiling_is_one_clear_4xx(env):
    till, upstream = env
    key = till.run("mint", "--upstream", "openai", "--cap", "5", "--max-output-tokens", "64")
    attempts = Attempts()
    client = openai.OpenAI(base_url=f"{till.url}/openai/v1", api_key=key,
                           http_client=attempts.client, max_retries=2)
    before = len(upstream.hits)
    ok = client.chat.completions.create(
        model="gpt-x", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content == "hi"
    assert attempts.n == 1

    attempts.n = 0
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(
            model="gpt-x", max_tokens=65, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 403
    assert err.value.body["code"] == "max_output_tokens_exceeded"
    assert attempts.n == 1, "the SDK must not retry a refused ceiling"

    attempts.n = 0
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "max_output_tokens_required"
    assert attempts.n == 1
    assert len(upstream.hits) == before + 1, "refused calls never reach the upstream"

    usage = json.loads(till.run("usage", key, "--json"))
    used = [b["used"] for b in usage["blocks"]]
    assert used == [1], f"refused calls are not charged: {usage}"


def test_anthropic_sdk_ceiling_is_one_clear_4xx(env):
    till, upstream = env
    key = till.run("mint", "--upstream", "anthropic", "--cap", "5",
                   "--max-output-tokens", "100")
    attempts = Attempts()
    client = anthropic.Anthropic(base_url=f"{till.url}/anthropic", api_key=key,
                                 http_client=attempts.client, max_retries=2)
    ok = client.messages.create(model="claude-x", max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}])
    assert ok.content[0].text == "hi"
    attempts.n = 0
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        client.messages.create(model="claude-x", max_tokens=4096,
                               messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 403
    assert err.value.body["error"]["code"] == "max_output_tokens_exceeded"
    assert attempts.n == 1, "the SDK must not retry a refused ceiling"


def test_openai_sdk_rate_limit_is_free_and_honours_retry_after(env):
    till, upstream = env
    key = till.run("mint", "--upstream", "openai", "--cap", "10", "--rate", "1/m")
    attempts = Attempts()
    client = openai.OpenAI(base_url=f"{till.url}/openai/v1", api_key=key,
                           http_client=attempts.client, max_retries=0)
    client.chat.completions.create(model="gpt-x",
                                   messages=[{"role": "user", "content": "hi"}])
    attempts.n = 0
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-x",
                                       messages=[{"role": "user", "content": "hi"}])
    resp = err.value.response
    assert resp.status_code == 429
    assert err.value.body["code"] == "rate_limited"
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    assert resp.headers["x-should-retry"] == "true"
    assert attempts.n == 1
    usage = json.loads(till.run("usage", key, "--json"))
    assert [b["used"] for b in usage["blocks"]] == [1], "a rate-limited call is not charged"


def test_python_attenuated_ceiling_is_enforced(env):
    """A block appended by biscuit-python (no declaration, spec/token.md §13) carrying a
    tighter ceiling: Till reads it back and the SDK gets the refusal naming block 1."""
    import sys

    sys.path.insert(0, str(REPO / "spec" / "interop"))
    import till_attenuate as ta

    till, _ = env
    key = till.run("mint", "--upstream", "openai", "--cap", "5", "--max-output-tokens", "64")
    sub = ta.attenuate(key, max_output_tokens=32, root_public_key=str(till.dir / "root.pub.jwk"))
    info = ta.inspect(sub)
    assert info["blocks"][1]["caveats"] == {"max_output_tokens": 32}
    assert info["effective"]["max_output_tokens"] == 32
    client = openai.OpenAI(base_url=f"{till.url}/openai/v1", api_key=sub, max_retries=2,
                           http_client=Attempts().client)
    client.chat.completions.create(model="gpt-x", max_tokens=32,
                                   messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="gpt-x", max_tokens=33,
                                       messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "max_output_tokens_exceeded"

