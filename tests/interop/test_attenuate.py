"""Attenuating a Till key from other languages, against the real proxy (issue 14).

Stock libraries from their registries append blocks to a key minted by `till`:
biscuit-python (PyPI) through spec/interop/till_attenuate.py, and
@biscuit-auth/biscuit-wasm (npm) from Node (tests/interop/attenuate.mjs). A real
`till serve` in front of `till mock-upstream` must accept those keys and enforce them
exactly (cap, path, model, method), refuse near-misses as key_not_canonical, and its
receipts must verify with the helper.

Run: target/test-venv/bin/python -m pytest tests/interop (tests/run.sh does, after building
till-cli and installing spec/interop/requirements-token.txt and tests/interop's npm package).
TILL_BIN overrides the binary; TILL_INTEROP_REQUIRE_NODE=1 turns a missing Node setup
from a skip into a failure.
"""

import base64
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import biscuit_auth
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "spec" / "interop"))

import till_attenuate as ta  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
TILL = Path(os.environ.get("TILL_BIN") or TARGET / "debug" / "till")
CREDENTIAL = "sk-interop-secret"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, deadline=30.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


class Till:
    def __init__(self, tmp):
        self.dir = tmp / "data"
        self.procs = []
        self.log = open(tmp / "serve.log", "wb")
        try:
            self.start(tmp)
        except BaseException:
            self.close()
            raise

    def start(self, tmp):
        self.run("keygen")
        self.root_jwk = self.dir / "root.pub.jwk"
        self.receipt_jwk = self.dir / "receipt.pub.jwk"
        mock_port = free_port()
        mock = subprocess.Popen(
            [str(TILL), "mock-upstream", "--listen", f"127.0.0.1:{mock_port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(mock)
        wait_port(mock_port, mock)
        config = tmp / "till.toml"
        config.write_text(
            f'[upstreams.openai]\nbase_url = "http://127.0.0.1:{mock_port}"\n'
            'credential_env = "TILL_INTEROP_SECRET"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env.pop("TILL_CONFIG", None)
        env["TILL_INTEROP_SECRET"] = CREDENTIAL
        serve = subprocess.Popen(
            [str(TILL), "--dir", str(self.dir), "serve", "--config", str(config),
             "--listen", "127.0.0.1:0", "--admin-listen", "none"],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
        )
        self.procs.append(serve)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in serve.stdout], daemon=True).start()
        end = time.monotonic() + 30
        self.url = None
        while self.url is None and time.monotonic() < end:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if serve.poll() is not None:
                    break
                continue
            if line.startswith("listening on "):
                self.url = line[len("listening on "):].strip()
        if self.url is None:
            raise RuntimeError("till serve did not start: " + (tmp / "serve.log").read_text())

    def run(self, *args, stdin=None):
        out = subprocess.run(
            [str(TILL), "--dir", str(self.dir), *args],
            input=stdin, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, f"till {args[0]} failed: {out.stderr}"
        return out.stdout.strip()

    def mint(self, *args):
        return self.run("mint", "--upstream", "openai", *args)

    def call(self, key, path="/v1/chat/completions", model="gpt-4o-mini", method="POST"):
        """One request through the proxy: (status, headers, JSON body)."""
        data = None
        headers = {"Authorization": f"Bearer {key}"}
        if method != "GET":
            body = {"messages": [{"role": "user", "content": "hi"}]}
            if model is not None:
                body["model"] = model
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        req = urllib.request.Request(f"{self.url}/openai{path}", data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read() or b"null")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            if p.stdout:
                p.stdout.close()
        self.log.close()


@pytest.fixture(scope="module")
def till():
    if not TILL.exists():
        pytest.fail(f"{TILL} not built (cargo build -p till-cli)")
    tmp = Path(tempfile.mkdtemp(prefix="till-interop-"))
    t = Till(tmp)
    yield t
    t.close()
    shutil.rmtree(tmp, ignore_errors=True)


def code(body):
    return body["error"]["code"]


def assert_enforced(till, sub, cap):
    """`sub` allows exactly `cap` calls under /v1/chat and nothing outside it."""
    status, _, body = till.call(sub, path="/v1/models", method="GET")
    assert (status, code(body)) == (403, "path_not_allowed")
    status, _, body = till.call(sub, path="/v1/chatty")
    assert (status, code(body)) == (403, "path_not_allowed")
    for n in range(cap):
        status, headers, body = till.call(sub)
        assert status == 200, body
        assert headers["till-activations-remaining"] == str(cap - n - 1)
    status, _, body = till.call(sub)
    assert (status, code(body)) == (403, "activation_limit_reached")


# ------------------------------------------------------------------ biscuit-python


def test_python_appends_a_narrower_cap_and_path(till):
    key = till.mint("--cap", "5", "--path", "/v1")
    sub = ta.attenuate(key, cap=2, paths=["/v1/chat"], root_public_key=str(till.root_jwk))

    info = ta.inspect(sub)
    assert [b["declared"] for b in info["blocks"]] == [True, False]
    assert info["blocks"][1]["caveats"] == {"paths": ["/v1/chat"], "cap": 2}
    assert info["effective"]["cap"] == 2 and info["effective"]["paths"] == ["/v1/chat"]
    # Till reads the same block back, signature verified.
    cli = json.loads(till.run("inspect", "-", "--json", stdin=sub))
    assert cli["signature"]["status"] == "verified"
    assert cli["blocks"][1]["caveats"] == {"paths": ["/v1/chat"], "cap": 2}
    assert [b["revocation_id"] for b in cli["blocks"]] == [b["revocation_id"] for b in info["blocks"]]
    assert cli["effective"] == info["effective"]

    # First call: receipt verifies with the helper and names both blocks' slots.
    status, headers, body = till.call(sub)
    assert status == 200, body
    assert headers["till-activations-remaining"] == "1"
    receipt = ta.verify_receipt(headers["till-receipt"], str(till.receipt_jwk))
    assert [(s["block"], s["revocation_id"], s["slot"], s.get("cap")) for s in receipt["slots"]] == [
        (0, info["blocks"][0]["revocation_id"], 1, 5),
        (1, info["blocks"][1]["revocation_id"], 1, 2),
    ]
    assert receipt["request"]["path"] == "/v1/chat/completions"
    with pytest.raises(ValueError):
        compact = headers["till-receipt"]
        flipped = compact[:-3] + ("A" if compact[-3] != "A" else "B") + compact[-2:]
        ta.verify_receipt(flipped, str(till.receipt_jwk))

    # Cap exact (one left), path outside the prefix refused.
    status, _, body = till.call(sub, path="/v1/models", method="GET")
    assert (status, code(body)) == (403, "path_not_allowed")
    status, headers, _ = till.call(sub)
    assert status == 200 and headers["till-activations-remaining"] == "0"
    status, _, body = till.call(sub)
    assert (status, code(body)) == (403, "activation_limit_reached")
    # The parent is not spent by the child's sub-cap: 5 - 2 left.
    status, headers, _ = till.call(key, path="/v1/models", method="GET")
    assert status == 200 and headers["till-activations-remaining"] == "2"


def test_till_extends_a_python_block_and_python_extends_again(till):
    key = till.mint("--cap", "10")
    py = ta.attenuate(key, cap=4, paths="/v1/chat", root_public_key=str(till.root_jwk))
    rust = till.run("attenuate", "-", "--cap", "3", stdin=py)
    py2 = ta.attenuate(rust, cap=2, models=["gpt-4o-mini"], root_public_key=till.root_jwk.read_text())
    info = ta.inspect(py2)
    assert [b["declared"] for b in info["blocks"]] == [True, False, True, False]
    assert info["blocks"][3]["caveats"] == {"models": ["gpt-4o-mini"], "cap": 2}
    status, _, body = till.call(py2, model="gpt-4o")
    assert (status, code(body)) == (403, "model_not_allowed")
    assert_enforced(till, py2, 2)


def test_python_models_methods_and_ttl(till, monkeypatch):
    key = till.mint("--cap", "5")
    monkeypatch.setenv("TILL_ROOT_PUBLIC_KEY", str(till.root_jwk))
    now = int(time.time())
    sub = ta.attenuate(key, models=["gpt-4o-mini"], methods=["post"], ttl="1h")
    caveats = ta.inspect(sub)["blocks"][1]["caveats"]
    assert caveats["methods"] == ["POST"] and caveats["models"] == ["gpt-4o-mini"]
    assert now + 3600 <= caveats["expires"] <= int(time.time()) + 3600
    status, _, body = till.call(sub, model="gpt-4o")
    assert (status, code(body)) == (403, "model_not_allowed")
    status, _, body = till.call(sub, path="/v1/models", method="GET")
    assert (status, code(body)) == (403, "method_not_allowed")
    status, _, body = till.call(sub)
    assert status == 200, body


def append_raw(till, key, source):
    """A block appended with biscuit-python directly, with any Datalog."""
    raw = base64.urlsafe_b64decode(key[5:] + "=" * (-len(key[5:]) % 4))
    root = ta._root_public_key(str(till.root_jwk))
    token = biscuit_auth.Biscuit.from_bytes(raw, root).append(biscuit_auth.BlockBuilder(source))
    return "till_" + base64.urlsafe_b64encode(token.to_bytes()).decode().rstrip("=")


@pytest.mark.parametrize(
    "source",
    [
        'check if till_method("POST") or till_method("GET");',  # unsorted alternatives
        "check if till_activation(0, $n), $n <= 1;",  # names the parent's index
        "check if till_activation(1, $n), $n < 2;",  # same meaning, not canonical
        'check if till_path($p), $p.starts_with("/v1/chat");',  # not segment-aware
        'check if till_rate(1);',  # unknown predicate
        "check if till_activation(1, $n), $n <= 1; till_activation(1, 0);",  # a fact
        'check if till_upstream("anthropic");',  # another upstream
        'check if till_method($m), {"GET", "POST"}.contains($m);',  # a set
    ],
)
def test_non_canonical_blocks_are_refused(till, source):
    key = till.mint("--cap", "5")
    bad = append_raw(till, key, source)
    status, _, body = till.call(bad)
    assert (status, code(body)) == (401, "key_not_canonical")
    with pytest.raises(ValueError):
        ta.inspect(bad)


def test_the_canonical_datalog_written_by_hand_is_accepted(till):
    key = till.mint("--cap", "5")
    ok = append_raw(
        till, key,
        'check if till_path($p), $p == "/v1/chat" || $p.starts_with("/v1/chat/");\n'
        "check if till_activation(1, $n), $n <= 1;",
    )
    assert_enforced(till, ok, 1)


def test_helper_refuses_what_till_would(till, monkeypatch):
    key = till.mint("--cap", "5")
    root = str(till.root_jwk)
    for bad in [dict(paths=["/a/../b"]), dict(paths=["v1"]), dict(models=['a"b']),
                dict(methods=["GE T"]), dict(cap=-1), dict(cap=2**63), dict(paths=[]), {}]:
        with pytest.raises(ValueError):
            ta.attenuate(key, root_public_key=root, **bad)
    monkeypatch.delenv("TILL_ROOT_PUBLIC_KEY", raising=False)
    with pytest.raises(ValueError, match="root public key"):
        ta.attenuate(key, cap=1)
    with pytest.warns(UserWarning):
        ta.attenuate(key, cap=9, root_public_key=root)
    # The helper's parser agrees with Till's on the spec's example.
    example = (
        'check if till_upstream("openai");\n'
        'check if till_method("GET") or till_method("POST");\n'
        'check if till_path($p), $p == "/v1/chat" || $p.starts_with("/v1/chat/") or '
        'till_path($p), $p.starts_with("/v1/embeddings/");\n'
        'check if till_model("gpt-4o") or till_model("gpt-4o-mini");\n'
        "check if time($t), $t <= 2033-05-18T03:33:20Z;\n"
        "check if till_activation(2, $n), $n <= 10;\n"
    )
    parsed = ta.parse_block_source(example, 2)
    assert parsed["expires"] == 2_000_000_000 and parsed["cap"] == 10
    with pytest.raises(ValueError):
        ta.parse_block_source(example, 1)


def test_token_vectors_read_back_with_the_helper():
    """Every block of spec/vectors/token.json parses in Python as in Rust."""
    vectors = json.loads((REPO / "spec" / "vectors" / "token.json").read_text())
    undeclared = 0
    for v in vectors["valid"]:
        info = ta.inspect(v["key"])
        for block, expected in zip(info["blocks"], v["inspection"]["blocks"]):
            assert block["caveats"] == expected["caveats"], v["name"]
            assert block["revocation_id"] == expected["revocation_id"]
            undeclared += not block["declared"]
        assert info["effective"] == v["inspection"]["effective"], v["name"]
    assert undeclared >= 2
    for v in vectors["invalid"]:
        if v["name"].startswith("undeclared-"):
            with pytest.raises(ValueError):
                ta.inspect(v["key"])


# ------------------------------------------------------------------ @biscuit-auth/biscuit-wasm


def test_node_biscuit_wasm_appends_a_narrower_cap_and_path(till):
    node = shutil.which("node")
    installed = (HERE / "node_modules" / "@biscuit-auth" / "biscuit-wasm").is_dir()
    if not (node and installed):
        why = "node not found" if not node else "npm package not installed (npm ci in tests/interop)"
        if os.environ.get("TILL_INTEROP_REQUIRE_NODE") == "1":
            pytest.fail(why)
        pytest.skip(why)
    key = till.mint("--cap", "5", "--path", "/v1")
    out = subprocess.run(
        # The package is built for bundlers (it imports its .wasm as an ES module), which
        # Node runs behind --experimental-wasm-modules.
        [node, "--experimental-wasm-modules", "--no-warnings", str(HERE / "attenuate.mjs"),
         str(till.root_jwk), "2", "/v1/chat"],
        input=key, capture_output=True, text=True, timeout=60, cwd=HERE,
    )
    assert out.returncode == 0, out.stderr
    # The package logs "biscuit-wasm loading" on stdout when it loads; the key comes last.
    sub = out.stdout.strip().splitlines()[-1]
    info = ta.inspect(sub)
    assert info["blocks"][1] == {**info["blocks"][1], "declared": False,
                                 "caveats": {"paths": ["/v1/chat"], "cap": 2}}
    assert_enforced(till, sub, 2)
