"""Public identifiers: a readable type prefix plus random base62 characters (OpenAI's style)."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def random_token(length: int) -> str:
    """A cryptographically random base62 string."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_id(prefix: str, length: int = 24) -> str:
    """`new_id("file-")` -> `file-<24 random characters>`; the prefix carries its separator."""
    return f"{prefix}{random_token(length)}"
