"""Creating, revoking and checking API keys."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.keys import generate_key, hash_key, is_acceptable_key, visible_prefix
from app.auth.repository import ApiKeyLookup
from app.config import Settings
from app.kit.errors import BadRequest, Conflict, NotFound, Unauthorized
from app.kit.ids import new_id
from app.kit.time import utcnow
from app.models import ApiKey, Project, Scope
from app.projects import service as projects

DEFAULT_PROJECT_NAME = "default"

_MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_MALFORMED = "Malformed Authorization header: expected exactly 'Bearer <key>' with a single space."
_INCORRECT = "Incorrect API key provided."
_REVOKED = "This API key has been revoked."


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key and the project every read and write is limited to."""

    key_id: str
    project_id: str
    scope: Scope
    prefix: str


def key_from_authorization(header: str | None) -> str:
    """The key in `Authorization: Bearer <key>`, or 401 with what is wrong."""
    if header is None or not header.strip():
        raise Unauthorized(_MISSING_KEY)
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized(_MALFORMED)
    if not key:
        raise Unauthorized(_MISSING_KEY)
    if not is_acceptable_key(key):
        raise Unauthorized(_MALFORMED)
    return key


async def authenticate(session: AsyncSession, digest: str, settings: Settings) -> Principal:
    """The key whose SHA-256 (`keys.hash_key`) is `digest`, or 401 (unknown or revoked)."""
    lookup = ApiKeyLookup(session)
    stored = await lookup.by_hash(digest)
    if stored is None or not hmac.compare_digest(stored.key_hash, digest):
        raise Unauthorized(_INCORRECT)
    if stored.revoked_at is not None:
        raise Unauthorized(_REVOKED)
    now = utcnow()
    last = stored.last_used_at
    if last is None or now - last >= settings.auth.last_used_resolution:
        await lookup.touch(stored.id, now)
    return Principal(
        key_id=stored.id,
        project_id=stored.project_id,
        scope=Scope(stored.scope),
        prefix=stored.prefix,
    )


async def create_key(
    session: AsyncSession, project: Project, scope: Scope, name: str | None = None
) -> tuple[ApiKey, str]:
    """A new key for `project`; returns the stored row and the key, which is never stored."""
    plaintext, prefix = generate_key()
    row = ApiKey(
        id=new_id("key_"),
        project_id=project.id,
        name=name,
        scope=scope.value,
        prefix=prefix,
        key_hash=hash_key(plaintext),
    )
    session.add(row)
    await session.flush()
    await session.refresh(row)
    return row, plaintext


async def revoke_key(session: AsyncSession, key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await session.flush()
    return key


def _lookup_ident(ident: str) -> str:
    """What to look a key up by: an id (`key_…`) or a visible prefix as given, and a whole
    `tg-<prefix>-…` key reduced to its visible prefix (so its secret is never echoed)."""
    ident = ident.strip()
    return visible_prefix(ident) if ident.startswith("tg-") else ident


async def find_one_key(session: AsyncSession, ident: str) -> ApiKey:
    """The key with this id (`key_…`) or visible prefix, or the key a whole `tg-…` key is."""
    ident = _lookup_ident(ident)
    matches = await ApiKeyLookup(session).by_id_or_prefix(ident)
    if not matches:
        raise NotFound(f"No API key with id or prefix '{ident}'.", param="id")
    if len(matches) > 1:
        raise Conflict(f"More than one key has prefix '{ident}': use the key id.", param="id")
    return matches[0]


async def ensure_bootstrap_admin(session: AsyncSession, settings: Settings) -> ApiKey | None:
    """First start: if no admin key exists, make `TUNEGATE_BOOTSTRAP_ADMIN_KEY` the admin key
    of project `default` (created if missing). Returns the key row when one was created."""
    if settings.bootstrap_admin_key is None:
        return None
    lookup = ApiKeyLookup(session)
    if await lookup.any_active_admin():
        return None
    plaintext = settings.bootstrap_admin_key.get_secret_value()
    if not is_acceptable_key(plaintext):
        raise BadRequest(
            "TUNEGATE_BOOTSTRAP_ADMIN_KEY must be 8 to 256 printable characters without spaces"
        )
    if await lookup.by_hash(hash_key(plaintext)) is not None:
        # The same key exists but was revoked: do not silently bring it back.
        return None
    project = await projects.get_or_create(session, DEFAULT_PROJECT_NAME)
    row = ApiKey(
        id=new_id("key_"),
        project_id=project.id,
        name="bootstrap admin key",
        scope=Scope.admin.value,
        prefix=visible_prefix(plaintext),
        key_hash=hash_key(plaintext),
    )
    session.add(row)
    await session.flush()
    return row
