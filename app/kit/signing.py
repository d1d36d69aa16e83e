"""Webhook signatures as Standard Webhooks defines them (https://www.standardwebhooks.com/).

This is the scheme OpenAI and Svix use. A message carries three headers: `webhook-id` (stable
across retries, for deduplication), `webhook-timestamp` (Unix seconds, against replays) and
`webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` entries over
`"{id}.{timestamp}.{body}"`, one per secret in use, so a receiver keeps verifying while a secret
is rotated. Secrets are `whsec_<base64 key>`; a secret without that prefix is taken as raw
UTF-8 bytes, as OpenAI's documentation allows.

Error messages say what is wrong and never include a secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from secrets import token_bytes

SECRET_PREFIX = "whsec_"  # noqa: S105 - the marker of a secret, not one
SIGNATURE_VERSION = "v1"
SECRET_BYTES = 32
DEFAULT_TOLERANCE_SECONDS = 300.0

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


class SignatureError(Exception):
    """A webhook could not be verified: a header is missing or malformed, its timestamp is out
    of tolerance, no signature matches, or the secret itself is malformed."""


def new_secret() -> str:
    """A fresh `whsec_` secret holding 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(SECRET_BYTES)).decode("ascii")


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a secret: base64-decoded after `whsec_`, else the string's UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            # `from None`: the decoder's message could quote part of the secret.
            raise SignatureError(
                f"the webhook secret is not valid base64 after the '{SECRET_PREFIX}' prefix"
            ) from None
    else:
        key = secret.encode("utf-8")
    if not key:
        raise SignatureError("the webhook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}." + body>`."""
    return f"{SIGNATURE_VERSION},{_digest(secret_bytes(secret), msg_id, str(timestamp), body)}"


def headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers, with one signature per secret (for rotation)."""
    if isinstance(secrets, str) or not secrets:
        # A bare string is a sequence too: it would be signed one character at a time.
        raise ValueError("headers() needs a non-empty sequence of secrets")
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> str:
    """Check a received webhook and return its `webhook-id`; raise `SignatureError` if it fails.

    Header names are matched case-insensitively. The timestamp must be an integer no more than
    `tolerance_seconds` from `now` (default: the current time) in either direction. Any one of
    the `v1` signatures matching is enough; entries of other versions are ignored.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = _required(lowered, ID_HEADER)
    raw_timestamp = _required(lowered, TIMESTAMP_HEADER)
    signature_header = _required(lowered, SIGNATURE_HEADER)

    if not (raw_timestamp.isascii() and raw_timestamp.isdigit()):
        raise SignatureError(
            f"header '{TIMESTAMP_HEADER}' is not an integer number of seconds: "
            f"{raw_timestamp[:32]!r}"
        )
    timestamp = int(raw_timestamp)
    current = time.time() if now is None else now
    if current - timestamp > tolerance_seconds:
        raise SignatureError(
            f"webhook timestamp is too old: {current - timestamp:.0f} s ago, "
            f"more than the {tolerance_seconds:g} s tolerance"
        )
    if timestamp - current > tolerance_seconds:
        raise SignatureError(
            f"webhook timestamp is too new: {timestamp - current:.0f} s in the future, "
            f"more than the {tolerance_seconds:g} s tolerance"
        )

    candidates = []
    for entry in signature_header.split():
        version, _, signature = entry.partition(",")
        if version == SIGNATURE_VERSION and signature:
            candidates.append(signature.encode("utf-8"))
    if not candidates:
        raise SignatureError(f"header '{SIGNATURE_HEADER}' has no '{SIGNATURE_VERSION},' signature")

    expected = _digest(secret_bytes(secret), msg_id, raw_timestamp, body).encode("ascii")
    # Check every candidate, without stopping at a match, so timing says nothing about which.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError(
            f"no signature in header '{SIGNATURE_HEADER}' matches the body and the secret"
        )
    return msg_id


def _required(lowered: Mapping[str, str], name: str) -> str:
    value = lowered.get(name)
    if value is None:
        raise SignatureError(f"missing header '{name}'")
    value = value.strip()
    if not value:
        raise SignatureError(f"header '{name}' is empty")
    return value


def _digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
