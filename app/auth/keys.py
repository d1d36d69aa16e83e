"""API key format and hashing.

A key is `tg-<prefix>-<secret>`: the prefix (10 characters) is shown in listings so people can
tell keys apart; the secret (40 base62 characters, ~238 bits) never leaves the creation answer.
Only the SHA-256 of the whole key is stored: with this much entropy a slow hash adds nothing.
"""

from __future__ import annotations

import hashlib
import re

from app.kit.ids import random_token

KEY_PREFIX = "tg"
PREFIX_LENGTH = 10
SECRET_LENGTH = 40
_WELL_FORMED = re.compile(
    rf"^{KEY_PREFIX}-([A-Za-z0-9]{{{PREFIX_LENGTH}}})-[A-Za-z0-9]{{{SECRET_LENGTH}}}$"
)
# Bootstrap keys chosen by an operator may have any shape; this bounds what we accept at all.
_ACCEPTABLE = re.compile(r"^[\x21-\x7e]{8,256}$")


def generate_key() -> tuple[str, str]:
    """A new key and its visible prefix."""
    prefix = random_token(PREFIX_LENGTH)
    return f"{KEY_PREFIX}-{prefix}-{random_token(SECRET_LENGTH)}", prefix


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def visible_prefix(key: str) -> str:
    """The part of a key that may be shown: the prefix of a tunegate key; for a key of another
    shape (an operator's bootstrap key) a label derived from its hash, which reveals nothing."""
    match = _WELL_FORMED.match(key)
    return match.group(1) if match else "boot" + hash_key(key)[:6]


def is_acceptable_key(key: str) -> bool:
    return bool(_ACCEPTABLE.match(key))
