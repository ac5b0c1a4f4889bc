"""API keys: how a key is made and how it is stored.

A key is ``spk_`` + 43 URL-safe characters (32 random bytes). Only its SHA-256 and a short public prefix
are stored, so the database never holds anything that lets a reader call the API.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "spk_"
PUBLIC_CHARS = 12  # "spk_" and 8 characters: enough to tell keys apart, useless for guessing


def new_key() -> tuple[str, str, str]:
    """A fresh key, its public prefix and its hash (only the last two are stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key[:PUBLIC_CHARS], hash_key(key)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
