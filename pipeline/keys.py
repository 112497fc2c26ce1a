"""The secret key behind every pseudonym (twin ids, hashed identifiers).

The key comes from `TWIN_KEY` (the key itself) or `TWIN_KEY_FILE` (a file holding it),
never from the store: whoever has the store alone cannot reverse a twin id by hashing
guessed identifiers. Without a key, a fixed public development key is used and a
warning says so once: ids are then stable but not secret.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)
_DEV_KEY = b"twinline-development-key-not-secret"
MIN_KEY_BYTES = 16


@functools.cache
def secret_key() -> bytes:
    if os.environ.get("TWIN_KEY"):
        key = os.environ["TWIN_KEY"].encode()
        # The manifest holds an HMAC of a fixed label under the key (key_fingerprint): a short
        # key is found from it by brute force, and with it every pseudonym is reversed.
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"TWIN_KEY is shorter than {MIN_KEY_BYTES} bytes: use a long random key")
        return key
    path = os.environ.get("TWIN_KEY_FILE")
    if path:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"TWIN_KEY_FILE cannot be read ({e.strerror})") from None
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"the key in TWIN_KEY_FILE is shorter than {MIN_KEY_BYTES} bytes: use a long random key")
        return key
    log.warning("no TWIN_KEY or TWIN_KEY_FILE set: twin ids use the public development key "
                "(stable, but not secret); set a key for real data")
    return _DEV_KEY


def has_secret_key() -> bool:
    """Is a real key set? (A privacy profile refuses the public development key: its
    pseudonyms could be reversed by anyone hashing guessed identifiers.)"""
    return secret_key() != _DEV_KEY


def keyed_hash(*parts: str, length: int = 32) -> str:
    """HMAC-SHA256 of the parts (unit-separated), as hex, cut to `length` characters."""
    key = secret_key()
    base = _KEYED.get(key)
    if base is None:  # the key's HMAC state, made once: a copy of it costs a third of hmac.new
        base = _KEYED[key] = hmac.new(key, digestmod=hashlib.sha256)
    h = base.copy()
    h.update("\x1f".join(parts).encode("utf-8"))
    return h.hexdigest()[:length]


_KEYED: dict[bytes, hmac.HMAC] = {}  # by key, so that a changed key (tests clear secret_key) is honoured


def key_fingerprint() -> str:
    """A name for the key that reveals nothing of it: an HMAC of a fixed label.

    Recorded in the store's manifest (a store's twin ids and pseudonyms are only
    consistent under one key) and compared between Spark's driver and workers.
    """
    return keyed_hash("twinline-engine-key-check")


def key_in_use() -> bool:
    """Has this process hashed anything yet? (Only then does the store check the key:
    `twin check` or `twin build` need no key and should not ask for one.)"""
    return secret_key.cache_info().currsize > 0
