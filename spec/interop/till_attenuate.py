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
_CURRENCY = re.compile(r"[A-Za-z]{3}")
_REPO = re.compile(r"[A-Za-z0-9-]{1,39}/[A-Za-z0-9._-]{1,100}")
_POINTER = re.compile(r"(/[A-Za-z0-9._-]+)+")
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
    for name, top in (("expires", MAX_EXPIRES), ("cap", MAX_CAP),
                      ("max_output_tokens", MAX_CAP), ("amount_max", MAX_CAP)):
        v = caveats.get(name)
        if v is not None:
            _check_int(v, name, 0, top)
            out[name] = v
    if caveats.get("currencies") is not None:
        cs = _check_list(caveats["currencies"], "currency", _CURRENCY)
        out["currencies"] = sorted({c.lower() for c in cs})
    if caveats.get("repos") is not None:
        rs = _check_list(caveats["repos"], "repository", _REPO, lambda r: r.split("/")[1] not in (".", ".."))
        out["repos"] = sorted({r.lower() for r in rs})
    if caveats.get("json_max") is not None:
        m = dict(caveats["json_max"])
        _check_pointers(m)
        for v in m.values():
            _check_int(v, "json_max ceiling", 0, MAX_CAP)
        out["json_max"] = dict(sorted(m.items()))
    if caveats.get("json_allow") is not None:
        m = dict(caveats["json_allow"])
        _check_pointers(m)
        out["json_allow"] = {p: sorted(set(_check_list(v, "json_allow value", _MODEL)))
                             for p, v in sorted(m.items())}
    if caveats.get("windows") is not None:
        ws = list(caveats["windows"])
        if not ws:
            raise ValueError("give at least one window (omit the argument to not restrict)")
        best = {}
        for w in ws:
            secs, mx = (w["secs"], w["max"]) if isinstance(w, dict) else w
            if secs not in (60, 3600, 86400):
                raise ValueError("windows are per minute (60), hour (3600) or day (86400)")
            _check_int(mx, "window max", 1, MAX_CAP)
            best[secs] = min(mx, best.get(secs, mx))
        out["windows"] = [{"secs": k, "max": best[k]} for k in sorted(best)]
    return out


def _check_int(v, name, low, top):
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= top:
        raise ValueError(f"{name} must be an integer from {low} to {top}")


def _check_pointers(m):
    if not 1 <= len(m) <= 8:
        raise ValueError("give 1 to 8 JSON pointers")
    for p in m:
        if not isinstance(p, str) or len(p) > 128 or not _POINTER.fullmatch(p):
            raise ValueError(f"invalid JSON pointer {p!r} (e.g. /max_tokens)")


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
    # Per-call ceilings and windowed caps (spec/token.md §14), in this order.
    if "max_output_tokens" in c:
        lines.append(f"till_max_output_tokens($t), $t <= {c['max_output_tokens']}")
    if "amount_max" in c:
        lines.append(f"till_amount($a), $a <= {c['amount_max']}")
    if "currencies" in c:
        lines.append(" or ".join(f'till_currency("{x}")' for x in c["currencies"]))
    if "repos" in c:
        lines.append(" or ".join(f'till_repo("{x}")' for x in c["repos"]))
    for p, n in c.get("json_max", {}).items():
        lines.append(f'till_json_int("{p}", $v), $v <= {n}')
    for p, vs in c.get("json_allow", {}).items():
        lines.append(" or ".join(f'till_json_str("{p}", "{v}")' for v in vs))
    for w in c.get("windows", []):
        lines.append(f"till_window({index}, {w['secs']}, $n), $n <= {w['max']}")
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
        elif m := re.fullmatch(r"till_max_output_tokens\(\$t\), \$t <= (\d+)", body):
            once("max_output_tokens", int(m.group(1)))
        elif m := re.fullmatch(r"till_amount\(\$a\), \$a <= (\d+)", body):
            once("amount_max", int(m.group(1)))
        elif body.startswith("till_currency("):
            once("currencies", _alternatives(body, "till_currency"))
        elif body.startswith("till_repo("):
            once("repos", _alternatives(body, "till_repo"))
        elif m := re.fullmatch(r'till_json_int\("([^"]*)", \$v\), \$v <= (\d+)', body):
            c.setdefault("json_max", {})
            if m.group(1) in c["json_max"]:
                raise ValueError(f"two json_max checks for {m.group(1)}")
            c["json_max"][m.group(1)] = int(m.group(2))
        elif body.startswith("till_json_str("):
            pointers, values = set(), []
            for alt in body.split(" or "):
                m = re.fullmatch(r'till_json_str\("([^"]*)", "([^"]*)"\)', alt)
                if not m:
                    raise ValueError(f"not a till_json_str alternative: {alt!r}")
                pointers.add(m.group(1))
                values.append(m.group(2))
            if len(pointers) != 1:
                raise ValueError("a json_allow check names one pointer")
            c.setdefault("json_allow", {})
            (p,) = pointers
            if p in c["json_allow"]:
                raise ValueError(f"two json_allow checks for {p}")
            c["json_allow"][p] = values
        elif m := re.fullmatch(r"till_window\((\d+), (\d+), \$n\), \$n <= (\d+)", body):
            if m.group(1) != str(index):
                raise ValueError(f"the window check names block {m.group(1)}, not {index}")
            ws = c.setdefault("windows", [])
            if any(w["secs"] == int(m.group(2)) for w in ws):
                raise ValueError("two windows of one length")
            ws.append({"secs": int(m.group(2)), "max": int(m.group(3))})
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
        # spec/token.md §14: omitted from `effective` while no block declares them.
        for name in ("max_output_tokens", "amount_max"):
            if name in c:
                e[name] = min(e.get(name, c[name]), c[name])
        for name in ("currencies", "repos"):
            if name in c:
                e[name] = c[name] if name not in e else [x for x in e[name] if x in c[name]]
        for p, n in c.get("json_max", {}).items():
            m = e.setdefault("json_max", {})
            m[p] = min(m.get(p, n), n)
        for p, vs in c.get("json_allow", {}).items():
            m = e.setdefault("json_allow", {})
            m[p] = vs if p not in m else [x for x in m[p] if x in vs]
        for w in c.get("windows", []):
            ws = e.setdefault("windows", [])
            same = [x for x in ws if x["secs"] == w["secs"]]
            if same:
                same[0]["max"] = min(same[0]["max"], w["max"])
            else:
                ws.append(dict(w))
            ws.sort(key=lambda x: (x["secs"], x["max"]))
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


_CEILINGS = ("max_output_tokens", "amount_max", "currencies", "repos", "json_max", "json_allow", "windows")


def attenuate(key, cap=None, paths=None, models=None, methods=None, ttl=None, *, root_public_key=None, **ceilings):
    """Appends a block that narrows `key` and returns the new key string, for a sub-agent.

    cap: at most this many activations through the new key and its descendants.
    paths / models / methods: allowed values (a list, or one string). ttl: seconds, a
    timedelta or "90m"/"24h"/"7d" from now. Per-call ceilings and windowed caps
    (spec/token.md §14) as keywords: max_output_tokens=, amount_max=, currencies=, repos=,
    json_max={pointer: n}, json_allow={pointer: [values]}, windows=[{"secs": 60, "max": 10}].
    A block can only narrow: asking for more than the key allows has no effect (a warning
    is issued for a higher cap or expiry).
    """
    unknown = set(ceilings) - set(_CEILINGS)
    if unknown:
        raise TypeError(f"unknown caveats {sorted(unknown)}; known: {_CEILINGS}")
    caveats = {"cap": cap, "paths": paths, "models": models, "methods": methods, **ceilings}
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
