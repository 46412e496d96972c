"""API-key authentication (Bearer tokens compared in constant time)."""

from __future__ import annotations

import hmac

# Open without a key, as in vLLM: probes, scrapers and the docs must work unauthenticated.
PUBLIC_PATHS = frozenset(
    {"/health", "/metrics", "/version", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}
)


def is_public(path: str) -> bool:
    """Whether `path` is served without an API key."""
    return path in PUBLIC_PATHS


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(presented: str | None, expected: str) -> bool:
    """Compare keys in constant time, so response timing does not leak the key."""
    # compare_digest needs equal types; bytes also handles non-ASCII keys.
    candidate = (presented or "").encode("utf-8")
    return hmac.compare_digest(candidate, expected.encode("utf-8")) and presented is not None
