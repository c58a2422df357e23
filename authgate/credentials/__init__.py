"""Credential store: stored-secret schemes and the users file."""

from authgate.credentials.schemes import (
    SCHEMES,
    WRITABLE_SCHEMES,
    SchemeError,
    StoredSecret,
    hash_password,
    parse_secret,
)
from authgate.credentials.store import (
    DEFAULT_WRITE_SCHEMES,
    DIRECTORY_REASON,
    StoreError,
    StoreOffer,
    User,
    UserStore,
    generate_secrets,
)

__all__ = [
    "DEFAULT_WRITE_SCHEMES",
    "DIRECTORY_REASON",
    "SCHEMES",
    "WRITABLE_SCHEMES",
    "SchemeError",
    "StoreError",
    "StoreOffer",
    "StoredSecret",
    "User",
    "UserStore",
    "generate_secrets",
    "hash_password",
    "parse_secret",
]
