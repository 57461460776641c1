"""Till keys from Python: attenuate, inspect, verify receipts (spec/token.md §13).

One file on top of stock libraries from PyPI (pinned in spec/interop/requirements.txt):
biscuit-python (`biscuit_auth`) appends and signs blocks, joserfc verifies receipts.

    from till_attenuate import attenuate, inspect, verify_receipt
    sub = attenuate(key, cap=2, paths=["/v1/chat"], ttl="1h", root_public_key="root.pub.jwk")
    inspect(sub)["effective"]       # {'upstream': 'openai', 'paths': ['/v1/chat'], 'cap': 2, ...}
    verify_receipt(response.headers["till-receipt"], "receipt.pub.jwk")   # the signed body

A block appended here carries no declaration (biscuit-python cannot set a block's
context); its Datalog is exactly Till's canonical rendering of the caveats, which Till
reads back (spec/token.md §13). biscuit-python 0.4 serialises only a token whose root
signature it has verified, so attenuating needs the root public key (public: `till keygen`
prints it, the data dir's `root.pub.jwk` holds it); `root_public_key` defaults to the
environment variable TILL_ROOT_PUBLIC_KEY. `inspect` needs no key.
"""

import base64
import hashlib
import json
import os
import re
import time
import warnings
from datetime import datetime, timedelta, timezone

import biscuit_auth

KEY_PREFIX = "till_"
CONTEXT_PREFIX = "till:v1:"
MAX_BLOCKS = 16
MAX_EXPIRES = 253402300799  # 9999-12-31T23:59:59Z
MAX_CAP = 2**63 - 1

_UPSTREAM = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_METHOD = re.compile(r"[A-Za-z]{1,16}")
_MODEL = re.compile(r"[A-Za-z0-9._:/@+-]{1,256}")
_PATH = re.compile(r"/[A-Za-z0-9/\-._~!$&'()*+,;=:@]{0,255}")
_TTL = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# ------------------------------------------------------------------ caveats and Datalog


def _check_list(values, what, pattern, extra=None):
    if isinstance(values, str):
        values = [values]
    values = list(values)
    if not 1 <= len(values) <= 32:
        raise ValueError(f"give 1 to 32 {what} values (omit the argument to not restrict)")
    for v in values:
        if not isinstance(v, str) or not pattern.fullmatch(v) or (extra and not extra(v)):
            raise ValueError(f"invalid {what} {v!r}")
    return values


def _path_ok(p):
    return "//" not in p and not any(s in (".", "..") for s in p.split("/"))


def normalize(caveats):
    """Validates caveats and puts them in Till's canonical form (sorted, deduplicated
    lists, upper-case methods), as spec/token.md §3 defines; raises ValueError."""
    out = {}
    if caveats.get("upstream") is not None:
        if not _UPSTREAM.fullmatch(caveats["upstream"]):
            raise ValueError(f"invalid upstream {caveats['upstream']!r}")
        out["upstream"] = caveats["upstream"]
    if caveats.get("methods") is not None:
        ms = _check_list(caveats["methods"], "method", _METHOD)
        out["methods"] = sorted({m.upper() for m in ms})
    if caveats.get("paths") is not None:
        out["paths"] = sorted(set(_check_list(caveats["paths"], "path", _PATH, _path_ok)))
    if caveats.get("models") is not None:
        out["models"] = sorted(set(_check_list(caveats["models"], "model", _MODEL)))
    for name, top in (("expires", MAX_EXPIRES), ("cap", MAX_CAP)):
        v = caveats.get(name)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
                raise ValueError(f"{name} must be an integer from 0 to {top}")
            out[name] = v
    return out


def _rfc3339(unix):
    return datetime.fromtimestamp(unix, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def block_source(caveats, index):
    """The canonical Datalog of a block (spec/token.md §4): one `check if` line per caveat,
    in a fixed order, each ending in `;` and a newline. `index` is the block's position."""
    c = normalize(caveats)
    lines = []
    if "upstream" in c:
        lines.append(f'till_upstream("{c["upstream"]}")')
    if "methods" in c:
        lines.append(" or ".join(f'till_method("{m}")' for m in c["methods"]))
    if "paths" in c:
        alts = []
        for p in c["paths"]:
            if p.endswith("/"):
                alts.append(f'till_path($p), $p.starts_with("{p}")')
            else:
                alts.append(f'till_path($p), $p == "{p}" || $p.starts_with("{p}/")')
        lines.append(" or ".join(alts))
    if "models" in c:
        lines.append(" or ".join(f'till_model("{m}")' for m in c["models"]))
    if "expires" in c:
        lines.append(f"time($t), $t <= {_rfc3339(c['expires'])}")
    if "cap" in c:
        lines.append(f"till_activation({index}, $n), $n <= {c['cap']}")
    return "".join(f"check if {line};\n" for line in lines)


def _alternatives(body, predicate):
    out = []
    for alt in body.split(" or "):
        m = re.fullmatch(re.escape(predicate) + r'\("([^"]*)"\)', alt)
        if not m:
            raise ValueError(f"not a {predicate} alternative: {alt!r}")
        out.append(m.group(1))
    return out


def parse_block_source(source, index):
    """Reads the caveats of a block without declaration back from its printed Datalog.
    Like Till (spec/token.md §13): the source must be exactly `block_source(caveats,
    index)` of what it reads, byte for byte; anything else raises ValueError."""
    if not source:
        raise ValueError("a block without declaration must have checks")
    c = {}

    def once(name, value):
        if name in c:
            raise ValueError(f"two {name} checks in one block")
        c[name] = value

    for line in source.splitlines(keepends=True):
        if not (line.startswith("check if ") and line.endswith(";\n")):
            raise ValueError(f"not a Till caveat check: {line!r}")
        body = line[len("check if ") : -2]
        if body.startswith("till_upstream("):
            once("upstream", _alternatives(body, "till_upstream")[0])
        elif body.startswith("till_method("):
            once("methods", _alternatives(body, "till_method"))
        elif body.startswith("till_model("):
            once("models", _alternatives(body, "till_model"))
        elif body.startswith("till_path("):
            paths = []
            for alt in body.split(" or "):
                m = re.match(r'till_path\(\$p\), \$p[^"]*"([^"]*)"', alt)
                if not m:
                    raise ValueError(f"not a till_path alternative: {alt!r}")
                paths.append(m.group(1))
            once("paths", paths)
        elif body.startswith("time($t), $t <= "):
            date = body[len("time($t), $t <= ") :]
            try:
                t = datetime.strptime(date, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
            except ValueError:
                raise ValueError(f"not an RFC 3339 UTC date: {date!r}") from None
            once("expires", int(t.timestamp()))
        elif m := re.fullmatch(r"till_activation\((\d+), \$n\), \$n <= (\d+)", body):
            if m.group(1) != str(index):
                raise ValueError(f"the cap check names block {m.group(1)}, not {index}")
            once("cap", int(m.group(2)))
        else:
            raise ValueError(f"not a Till caveat check: {line!r}")
    c = normalize(c)
    if block_source(c, index) != source:
        raise ValueError("the Datalog is not the canonical rendering of Till caveats")
    return c


# ------------------------------------------------------------------ keys


def _decode_key(key):
    key = key.strip()
    if not key.startswith(KEY_PREFIX):
        raise ValueError("not a Till key (no till_ prefix)")
    body = key[len(KEY_PREFIX) :]
    if not re.fullmatch(r"[A-Za-z0-9_-]+", body):
        raise ValueError("not a Till key (not base64url)")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _encode_key(raw):
    return KEY_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _fields(buf):
    """Protobuf wire format: yields (field number, value) of one message."""
    i = 0

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < len(buf):
        tag = varint()
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            yield field, varint()
        elif wire == 2:
            n = varint()
            yield field, buf[i : i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError("malformed key")


def _contexts(raw):
    """Each block's context (None when absent). biscuit-python has no accessor for it, so
    read it from the container (biscuit-auth schema.proto: Biscuit.authority = 2,
    .blocks = 3; SignedBlock.block = 1; Block.context = 2)."""
    signed = [v for f, v in _fields(raw) if f in (2, 3)]
    out = []
    for s in signed:
        block = next((v for f, v in _fields(s) if f == 1), b"")
        ctx = [v for f, v in _fields(block) if f == 2]
        out.append(ctx[-1].decode("utf-8") if ctx else None)
    return out


def _from_context(context):
    if not context.startswith(CONTEXT_PREFIX):
        raise ValueError("the block context is not a Till declaration")
    declared = json.loads(context[len(CONTEXT_PREFIX) :])
    label = declared.pop("label", None)
    c = normalize(declared)
    if label is not None:
        c["label"] = label
    return c


def _intersect_paths(have, new):
    def covers(outer, inner):
        if outer.endswith("/"):
            return inner.startswith(outer)
        return inner == outer or inner.startswith(outer + "/")

    out = set()
    for a in have:
        for b in new:
            if covers(a, b):
                out.add(b)
            elif covers(b, a):
                out.add(a)
    return sorted(out)


def _effective(blocks):
    e = dict.fromkeys(("upstream", "methods", "paths", "models", "expires", "cap"))
    for c in blocks:
        e["upstream"] = e["upstream"] or c.get("upstream")
        for name in ("methods", "models"):
            if name in c:
                e[name] = c[name] if e[name] is None else [x for x in e[name] if x in c[name]]
        if "paths" in c:
            e["paths"] = c["paths"] if e["paths"] is None else _intersect_paths(e["paths"], c["paths"])
        for name in ("expires", "cap"):
            if name in c:
                e[name] = c[name] if e[name] is None else min(e[name], c[name])
    return e


def inspect(key):
    """Decodes a Till key without any key (the signature is not checked: the proxy does
    that). Returns {"root_key_id", "blocks": [{"index", "revocation_id", "declared",
    "caveats"}], "effective"}; raises ValueError for a key Till would refuse as not
    canonical (what can be seen without the root key)."""
    raw = _decode_key(key)
    try:
        token = biscuit_auth.UnverifiedBiscuit.from_base64(base64.urlsafe_b64encode(raw).decode())
    except Exception as e:
        raise ValueError(f"not a Biscuit: {e}") from None
    contexts = _contexts(raw)
    blocks = []
    for i, (ctx, rid) in enumerate(zip(contexts, token.revocation_ids)):
        source = token.block_source(i)
        if ctx is not None:
            caveats = _from_context(ctx)
            rendered = {k: v for k, v in caveats.items() if k != "label"}
            if block_source(rendered, i) != source:
                raise ValueError(f"block {i}: its Datalog does not match its declaration")
        elif i == 0:
            raise ValueError("the authority block carries no Till declaration")
        else:
            caveats = parse_block_source(source, i)
        if i == 0 and "upstream" not in caveats:
            raise ValueError("the authority block names no upstream")
        if i > 0 and caveats.get("upstream", blocks[0]["caveats"]["upstream"]) != blocks[0]["caveats"]["upstream"]:
            raise ValueError(f"block {i} names another upstream than the key's")
        if i > 0 and "label" in caveats:
            raise ValueError("only the authority block may carry a label")
        blocks.append({"index": i, "revocation_id": rid, "declared": ctx is not None, "caveats": caveats})
    return {
        "root_key_id": token.root_key_id(),
        "blocks": blocks,
        "effective": _effective(b["caveats"] for b in blocks),
    }


def _load_jwk(jwk):
    if isinstance(jwk, dict):
        return jwk
    if isinstance(jwk, (bytes, bytearray)):
        jwk = jwk.decode("utf-8")
    if isinstance(jwk, str) and jwk.lstrip().startswith("{"):
        return json.loads(jwk)
    with open(os.fspath(jwk), encoding="utf-8") as f:
        return json.load(f)


def _b64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _root_public_key(root_public_key):
    if root_public_key is None:
        root_public_key = os.environ.get("TILL_ROOT_PUBLIC_KEY")
    if root_public_key is None:
        raise ValueError(
            "attenuate needs the root public key (biscuit-python serialises only verified "
            "tokens): pass root_public_key= (JWK, its path, or hex) or set TILL_ROOT_PUBLIC_KEY"
        )
    text = root_public_key.strip() if isinstance(root_public_key, str) else None
    if text and re.fullmatch(r"(ed25519/)?[0-9a-fA-F]{64}", text):
        x = bytes.fromhex(text[-64:])
    else:
        jwk = _load_jwk(root_public_key)
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise ValueError("the root public key must be an Ed25519 OKP JWK")
        x = _b64url(jwk["x"])
    return biscuit_auth.PublicKey.from_bytes(x, biscuit_auth.Algorithm.Ed25519)


def _ttl_seconds(ttl):
    if isinstance(ttl, timedelta):
        return int(ttl.total_seconds())
    if isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        return int(ttl)
    m = _TTL.fullmatch(str(ttl).strip())
    if not m:
        raise ValueError(f"ttl {ttl!r}: give seconds, a timedelta, or e.g. 90m, 24h, 7d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def attenuate(key, cap=None, paths=None, models=None, methods=None, ttl=None, *, root_public_key=None):
    """Appends a block that narrows `key` and returns the new key string, for a sub-agent.

    cap: at most this many activations through the new key and its descendants.
    paths / models / methods: allowed values (a list, or one string). ttl: seconds, a
    timedelta or "90m"/"24h"/"7d" from now. A block can only narrow: asking for more
    than the key allows has no effect (a warning is issued for a higher cap or expiry).
    """
    caveats = {"cap": cap, "paths": paths, "models": models, "methods": methods}
    if ttl is not None:
        seconds = _ttl_seconds(ttl)
        if seconds <= 0:
            raise ValueError("ttl must be positive")
        caveats["expires"] = int(time.time()) + seconds
    caveats = normalize(caveats)
    if not caveats:
        raise ValueError("an attenuation must restrict something (cap, paths, models, methods or ttl)")
    current = inspect(key)
    index = len(current["blocks"])
    if index >= MAX_BLOCKS:
        raise ValueError(f"a Till key has at most {MAX_BLOCKS} blocks")
    effective = current["effective"]
    for name in ("cap", "expires"):
        if name in caveats and effective[name] is not None and caveats[name] > effective[name]:
            warnings.warn(f"{name} is above the key's {name}; the key's {name} still applies", stacklevel=2)
    source = block_source(caveats, index)
    token = biscuit_auth.Biscuit.from_bytes(_decode_key(key), _root_public_key(root_public_key))
    appended = token.append(biscuit_auth.BlockBuilder(source))
    if appended.block_source(index) != source:  # what Till will compare, byte for byte
        raise RuntimeError(f"biscuit-python rendered the block as {appended.block_source(index)!r}")
    return _encode_key(appended.to_bytes())


# ------------------------------------------------------------------ receipts


def verify_receipt(receipt, public_jwk):
    """Verifies a Till activation receipt (the `till-receipt` response header, an EdDSA
    JWS in compact form; spec/receipt.md) with joserfc, and returns its body. `public_jwk`
    is the receipt public key (a JWK dict, its JSON, or a path such as receipt.pub.jwk).
    Raises ValueError when the receipt does not verify."""
    from joserfc import jws
    from joserfc.errors import SecurityWarning
    from joserfc.jwk import OKPKey

    jwk = _load_jwk(public_jwk)
    x = _b64url(jwk.get("x", ""))
    kid = "r-" + hashlib.sha256(x).digest()[:8].hex()
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or jwk.get("kid") != kid:
        raise ValueError("not a Till receipt public key (kid must be r- + hex(SHA-256(x)[:8]))")
    key = OKPKey.import_key({"kty": "OKP", "crv": "Ed25519", "x": jwk["x"], "kid": kid})
    with warnings.catch_warnings():
        # RFC 9864 deprecates the name "EdDSA"; Till's format uses it (RFC 8037).
        warnings.simplefilter("ignore", SecurityWarning)
        try:
            obj = jws.deserialize_compact(receipt.strip(), key, algorithms=["EdDSA"])
        except Exception as e:
            raise ValueError(f"receipt does not verify: {type(e).__name__}") from None
    if obj.headers() != {"alg": "EdDSA", "kid": kid, "typ": "till-receipt+jwt"}:
        raise ValueError("not a Till receipt header")
    body = json.loads(obj.payload)
    if body.get("kid") != kid:
        raise ValueError("the receipt body names another key")
    return body
