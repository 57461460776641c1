#!/usr/bin/env python3
"""Verify Till receipt test vectors with a stock JOSE library (interop check).

Usage:
    pip install joserfc==1.6.5
    python3 spec/interop/verify_receipt.py spec/vectors/receipts.json [spec/vectors/receipts-invalid.json]

Checks, with joserfc (not Till's code) doing the JWS/EdDSA verification:
  * the public JWK's kid is "r-" + hex(SHA-256(x)[:8]);
  * every receipt verifies under the public JWK, its protected header is exactly
    {"alg":"EdDSA","kid":<kid>,"typ":"till-receipt+jwt"}, its payload is the listed body,
    and its hash is SHA-256 of the JWS signing input (header "." payload, format v2);
  * the chain: one family, seq 1..n, prev = previous receipt's hash (None for seq 1),
    slots[0] is the family's level with slot == (net count + 1) (== seq without voids);
  * void receipts (receipts-void.json next to the first file): a void names an earlier,
    not yet voided claim and repeats its slots, request and idempotency key; the file's
    audit counts (claims, voids, charged) are what the chain shows;
  * the link is canonical: the signature's last character with its unused bits set is
    the same signature to a lenient decoder, and it changes the compact string's hash
    but not the link (whether joserfc accepts that string is reported, not required);
  * tampering fails: a changed payload under the original signature, a flipped signature
    character, and a different key are all rejected;
  * every invalid vector marked jose_must_reject is rejected.

Prints one line per failure and a final "N passed, M failed"; exits 1 on any failure.
"""

import base64
import hashlib
import json
import os
import sys
import warnings

from joserfc import jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import OKPKey

# RFC 9864 deprecates the polymorphic "EdDSA" name in favour of "Ed25519"; joserfc warns
# on every use. Till's format names "EdDSA" (RFC 8037), so note it once, not per receipt.
warnings.simplefilter("ignore", SecurityWarning)

ALGORITHMS = ["EdDSA"]
TYP = "till-receipt+jwt"


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def set_unused_bits(text: str) -> str:
    """The same base64url text with the unused low bits of its last character set
    (a 64-byte signature is 86 characters: the last carries 2 data bits, 4 unused)."""
    unused = (6 * len(text)) % 8
    index = B64URL_ALPHABET.index(text[-1])
    return text[:-1] + B64URL_ALPHABET[index | ((1 << unused) - 1)]


def canonical(obj) -> bytes:
    """serde_json's compact form for these bodies: no whitespace, insertion order, UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def verifies(compact: str, key) -> bool:
    try:
        jws.deserialize_compact(compact, key, algorithms=ALGORITHMS)
        return True
    except Exception:  # any rejection (bad signature, malformed input) counts
        return False


class Tally:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL: {what}")


def check_valid(path: str, t: Tally, want_void: bool = False) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    jwk = data["public_jwk"]
    key = OKPKey.import_key(jwk)
    x = b64url_decode(jwk["x"])
    t.check(len(x) == 32, "public key x is 32 bytes")
    t.check(
        jwk["kid"] == "r-" + hashlib.sha256(x).digest()[:8].hex(),
        "kid is r- + hex(SHA-256(x)[:8])",
    )
    other_key = OKPKey.generate_key("Ed25519")
    expected_header = canonical({"alg": "EdDSA", "kid": jwk["kid"], "typ": TYP})

    receipts = data["receipts"]
    t.check(len(receipts) > 0, "file has receipts")
    family = receipts[0]["body"]["family"] if receipts else None
    previous_hash = None
    net = 0  # the family's activations charged so far (claims minus voids)
    claims = {}  # claim receipts' bodies by seq
    voided = set()
    for i, vector in enumerate(receipts, start=1):
        compact = vector["compact"]
        body = vector["body"]
        label = f"receipt {i}"
        try:
            obj = jws.deserialize_compact(compact, key, algorithms=ALGORITHMS)
        except Exception as e:
            t.check(False, f"{label}: signature verifies ({type(e).__name__}: {e})")
            continue
        t.check(True, f"{label}: signature verifies")
        header_b64, payload_b64, signature_b64 = compact.split(".")
        t.check(b64url_decode(header_b64) == expected_header, f"{label}: canonical header")
        t.check(obj.headers() == json.loads(expected_header), f"{label}: header members")
        t.check(json.loads(obj.payload) == body, f"{label}: payload is the listed body")
        t.check(obj.payload == canonical(body), f"{label}: payload is canonical JSON")
        signing_input = f"{header_b64}.{payload_b64}"
        digest = hashlib.sha256(signing_input.encode("ascii")).hexdigest()
        t.check(digest == vector["hash"], f"{label}: hash is SHA-256 of the signing input")
        t.check(body["v"] == 2, f"{label}: v == 2")
        t.check(body["kid"] == jwk["kid"], f"{label}: body kid is the key's")

        # Chain.
        t.check(body["family"] == family, f"{label}: same family")
        t.check(body["seq"] == i, f"{label}: seq == {i}")
        t.check(body["prev"] == previous_hash, f"{label}: prev links to the previous receipt")
        first = body["slots"][0] if body["slots"] else {}
        if "void" in body:
            of = body["void"]
            original = claims.get(of)
            t.check(
                original is not None and of < body["seq"] and of not in voided,
                f"{label}: void names an earlier claim not voided before",
            )
            t.check(
                original is not None
                and all(original[m] == body[m] for m in ("slots", "request", "idempotency_key")),
                f"{label}: void repeats the claim's slots, request and idempotency key",
            )
            voided.add(of)
            net -= 1
        else:
            t.check(
                first.get("revocation_id") == family and first.get("slot") == net + 1,
                f"{label}: authority slot is the family's, slot == net count + 1",
            )
            claims[body["seq"]] = body
            net += 1
        previous_hash = digest

        # Tampering must fail.
        forged_body = dict(body, seq=body["seq"] + 1)
        forged = f"{header_b64}.{b64url_encode(canonical(forged_body))}.{signature_b64}"
        t.check(not verifies(forged, key), f"{label}: changed payload is rejected")
        sig = bytearray(b64url_decode(signature_b64))
        sig[10] ^= 0x01
        flipped = f"{header_b64}.{payload_b64}.{b64url_encode(bytes(sig))}"
        t.check(not verifies(flipped, key), f"{label}: flipped signature bit is rejected")
        t.check(not verifies(compact, other_key), f"{label}: another key is rejected")

        # A non-canonical encoding of the same signature (unused bits of the last
        # character set): same bytes to a lenient decoder, a different compact string,
        # the same link.
        lax_sig = set_unused_bits(signature_b64)
        t.check(lax_sig != signature_b64, f"{label}: lax signature string differs")
        t.check(
            b64url_decode(lax_sig) == b64url_decode(signature_b64),
            f"{label}: lax signature decodes to the same bytes",
        )
        lax = f"{header_b64}.{payload_b64}.{lax_sig}"
        lax_input = lax.rsplit(".", 1)[0]
        t.check(
            hashlib.sha256(lax.encode("ascii")).hexdigest()
            != hashlib.sha256(compact.encode("ascii")).hexdigest(),
            f"{label}: lax string has another compact hash",
        )
        t.check(
            hashlib.sha256(lax_input.encode("ascii")).hexdigest() == vector["hash"],
            f"{label}: lax string has the same link",
        )
        if i == 1:
            accepted = "accepts" if verifies(lax, key) else "rejects"
            print(f"note: joserfc {accepted} a signature with non-zero unused bits")

    audit = data.get("audit", {})
    t.check(
        (audit.get("claims"), audit.get("voids"), audit.get("charged"))
        == (len(claims), len(voided), len(claims) - len(voided)),
        f"{path}: audit counts claims, voids and charged",
    )
    if want_void:
        t.check(len(voided) > 0, f"{path}: has a void receipt")


def check_invalid(path: str, t: Tally) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    key = OKPKey.import_key(data["public_jwk"])
    for case in data["cases"]:
        if case["jose_must_reject"]:
            t.check(
                not verifies(case["compact"], key),
                f"invalid vector {case['name']} is rejected by joserfc",
            )


def main(argv) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[3], file=sys.stderr)
        return 2
    valid_path = argv[1]
    invalid_path = (
        argv[2]
        if len(argv) == 3
        else os.path.join(os.path.dirname(valid_path), "receipts-invalid.json")
    )
    t = Tally()
    check_valid(valid_path, t)
    void_path = os.path.join(os.path.dirname(valid_path), "receipts-void.json")
    if os.path.exists(void_path):
        check_valid(void_path, t, want_void=True)
    else:
        t.check(False, f"{void_path} exists")
    if os.path.exists(invalid_path):
        check_invalid(invalid_path, t)
    else:
        t.check(False, f"{invalid_path} exists")
    print(f"{t.passed} passed, {t.failed} failed")
    return 1 if t.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
