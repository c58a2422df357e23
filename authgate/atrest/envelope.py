"""The keyring and the sealed forms of files and audit records.

Envelope encryption: one random 256-bit *data key* encrypts everything; it is
stored only *wrapped* (AES-256-GCM) under a key derived from the admin
password with scrypt, in `<config dir>/authgate.keyring`. Changing the
password re-wraps those 32 bytes and touches no data file.

A sealed file is self-describing, so a half-finished conversion can always
be told apart from a finished one and simply resumed::

    magic     6  b"AGENC1"
    version   1  1
    key id   16  which keyring's data key sealed it (random, not secret)
    nonce    12  random per file and per write
    name len  2  big-endian
    name      n  the file's name (UTF-8): users.toml, master.secret, ...
    ciphertext + 16-byte GCM tag

Everything before the ciphertext is the GCM associated data: a sealed
master.secret copied over users.toml, or a flipped header byte, fails
authentication instead of being read as the wrong file.

Subkeys: the data key is never used directly; HKDF-SHA256 derives one key
for files, one for audit records and one for the audit hash chain, so a
record can never be replayed as a file (or the reverse) and the chain key
encrypts nothing.

Python cannot reliably wipe memory: the unwrapped key lives as long as the
Keyring object. What this protects against is a copied disk, backup or
file, not an attacker who can read the running proxy's memory.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import glob
import hmac
import json
import os
import secrets
import struct
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from authgate.errors import UserError

__all__ = [
    "DEFAULT_SCRYPT",
    "FILE_MAGIC",
    "KEYRING_NAME",
    "RECORD_MAGIC",
    "TEST_SCRYPT_ENV",
    "TEST_SLOW_IO_ENV",
    "AtRestError",
    "DamagedFile",
    "Keyring",
    "Locked",
    "PlaintextRefused",
    "ScryptParams",
    "WrongPassword",
    "atomic_write",
    "create_keyring",
    "fsync_dir",
    "is_sealed",
    "keyring_path",
    "open_secret_file",
    "password_bytes",
    "read_bytes",
    "remove_stale_temps",
    "rewrap_keyring",
    "scrypt_params_for_new_keyring",
    "test_pause",
    "unlock",
    "write_secret_file",
]

FILE_MAGIC: Final = b"AGENC1"
RECORD_MAGIC: Final = b"AGREC1"
FORMAT_VERSION: Final = 1
KEYRING_NAME: Final = "authgate.keyring"
KEYRING_VERSION: Final = 1

_KEY_ID_LEN: Final = 16
_NONCE_LEN: Final = 12  # the GCM standard nonce (NIST SP 800-38D, 8.2.2: random IVs)
_TAG_LEN: Final = 16
_DATA_KEY_LEN: Final = 32
_SALT_LEN: Final = 16
# magic, version, key id, nonce, name length
_FILE_FIXED: Final = struct.Struct(f">{len(FILE_MAGIC)}sB{_KEY_ID_LEN}s{_NONCE_LEN}sH")
# magic, version, key id, nonce
_RECORD_FIXED: Final = struct.Struct(f">{len(RECORD_MAGIC)}sB{_KEY_ID_LEN}s{_NONCE_LEN}s")
_TMP_SUFFIX: Final = ".authgate-tmp"

# ---------------------------------------------------------------- test hooks
#
# TEST HOOKS, off unless set; they exist only so the test suite can run
# quickly and interrupt conversions at random moments.
#
# AUTHGATE_TEST_SLOW_IO=<ms>: sleep that long between the steps of every
#   conversion (temp file written, renamed, directory synced, next file),
#   widening the windows a SIGKILL can land in.
# AUTHGATE_TEST_SCRYPT_LOG2N=<10..16>: make *new* keyrings with scrypt
#   n = 2**value instead of the default 2**17; a weak keyring, tests only.
#   The commands print a warning when it is set.
TEST_SLOW_IO_ENV: Final = "AUTHGATE_TEST_SLOW_IO"
TEST_SCRYPT_ENV: Final = "AUTHGATE_TEST_SCRYPT_LOG2N"


def test_pause() -> None:
    """Sleep for AUTHGATE_TEST_SLOW_IO milliseconds (test hook; no-op by default)."""
    raw = os.environ.get(TEST_SLOW_IO_ENV)
    if not raw:
        return
    try:
        delay = float(raw) / 1000
    except ValueError:
        return
    if delay > 0:
        time.sleep(min(delay, 10.0))


# -------------------------------------------------------------------- errors


class AtRestError(UserError):
    """A problem with encrypted data or the keyring; printed as one line."""


class WrongPassword(AtRestError):
    """The password does not unwrap the data key."""


class DamagedFile(AtRestError):
    """A sealed file, record or the keyring failed authentication or parsing."""


class Locked(AtRestError):
    """The file is encrypted and no keyring (password) was given."""


class PlaintextRefused(AtRestError):
    """A keyring exists, so every secret file must be sealed, and this one is
    not: a plaintext file could have been put there to replace the real one."""


# ---------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost (RFC 7914 section 2): n = 2**log2_n, block size r, parallelism p."""

    log2_n: int = 17
    r: int = 8
    p: int = 1

    def check(self) -> None:
        # Bounds on what a keyring file may ask for: a doctored keyring must not
        # make `unlock` allocate gigabytes (scrypt memory is 128 * r * n bytes).
        if not (1 <= self.log2_n <= 22 and 1 <= self.r <= 32 and 1 <= self.p <= 16):
            raise ValueError("scrypt parameters out of range")
        if 128 * self.r * (2**self.log2_n) > 1 << 30:
            raise ValueError("scrypt parameters need more than 1 GiB")


# 2**17 with r=8, p=1 (128 MiB, about half a second) is the OWASP password
# storage recommendation for scrypt; the brief's floor is 2**15.
DEFAULT_SCRYPT: Final = ScryptParams()


def scrypt_params_for_new_keyring() -> tuple[ScryptParams, bool]:
    """The parameters for a new wrap, and whether the test hook weakened them."""
    raw = os.environ.get(TEST_SCRYPT_ENV)
    if raw and raw.isdigit() and 10 <= int(raw) <= 16:
        return ScryptParams(log2_n=int(raw)), True
    return DEFAULT_SCRYPT, False


def password_bytes(password: str) -> bytes:
    """NFC, so the same password typed with combining or precomposed accents
    derives the same key."""
    if not password:
        raise AtRestError("the password is empty")
    return unicodedata.normalize("NFC", password).encode("utf-8")


# ------------------------------------------------------------------ keyring


def keyring_path(config_dir: Path) -> Path:
    return Path(config_dir) / KEYRING_NAME


def _subkey(data_key: bytes, purpose: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"authgate/atrest/" + purpose)
    return hkdf.derive(data_key)


class Keyring:
    """An unlocked keyring: seals and opens files and audit records.

    Not picklable or printable with its keys; `key_id` is public."""

    __slots__ = ("_chain_key", "_file_aead", "_record_aead", "key_id", "path")

    def __init__(self, path: Path, key_id: bytes, data_key: bytes) -> None:
        if len(data_key) != _DATA_KEY_LEN or len(key_id) != _KEY_ID_LEN:
            raise ValueError("bad key sizes")
        self.path = path
        self.key_id = key_id
        self._file_aead = AESGCM(_subkey(data_key, b"file v1"))
        self._record_aead = AESGCM(_subkey(data_key, b"audit record v1"))
        self._chain_key = _subkey(data_key, b"audit chain v1")

    def __repr__(self) -> str:
        return f"Keyring({str(self.path)!r}, key_id={self.key_id.hex()})"

    def __reduce__(self) -> Any:
        raise TypeError("a Keyring holds secret keys and is not picklable")

    # -- files

    def seal_file(self, name: str, plaintext: bytes) -> bytes:
        encoded = name.encode("utf-8")
        if len(encoded) > 0xFFFF:
            raise ValueError("file name too long")
        nonce = secrets.token_bytes(_NONCE_LEN)
        header = _FILE_FIXED.pack(FILE_MAGIC, FORMAT_VERSION, self.key_id, nonce, len(encoded))
        header += encoded
        return header + self._file_aead.encrypt(nonce, plaintext, header)

    def open_file(self, name: str, blob: bytes, *, source: str) -> bytes:
        """The plaintext of a sealed file called `name`; DamagedFile if it was
        changed, truncated, sealed under another name or by another keyring."""
        damaged = f"{source} is damaged or was modified"
        if len(blob) < _FILE_FIXED.size or not blob.startswith(FILE_MAGIC):
            raise DamagedFile(f"{damaged} (no valid header)")
        _, version, key_id, nonce, name_len = _FILE_FIXED.unpack_from(blob)
        if version != FORMAT_VERSION:
            raise DamagedFile(
                f"{source} is in encryption format {version}, which this authgate cannot read "
                "(written by a newer version, or damaged)"
            )
        header_end = _FILE_FIXED.size + name_len
        if len(blob) < header_end + _TAG_LEN:
            raise DamagedFile(f"{damaged} (truncated)")
        sealed_name = blob[_FILE_FIXED.size : header_end].decode("utf-8", "replace")
        if sealed_name != name:
            raise DamagedFile(
                f"{damaged}: it holds the encrypted contents of {sealed_name!r} "
                "(files swapped or renamed?)"
            )
        if not hmac.compare_digest(key_id, self.key_id):
            # A flipped bit and a file from another installation look alike.
            raise DamagedFile(
                f"{damaged}, or was encrypted with another keyring (key id "
                f"{key_id.hex()[:8]}..., not the one of {self.path})"
            )
        header = blob[:header_end]
        try:
            return self._file_aead.decrypt(nonce, blob[header_end:], header)
        except InvalidTag:
            raise DamagedFile(damaged) from None

    # -- audit records

    def seal_record(self, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_LEN)
        header = _RECORD_FIXED.pack(RECORD_MAGIC, FORMAT_VERSION, self.key_id, nonce)
        return header + self._record_aead.encrypt(nonce, plaintext, header)

    def open_record(self, blob: bytes) -> bytes:
        """The plaintext of a sealed audit record; ValueError if it is not one
        of ours or fails authentication (the caller names the line)."""
        if len(blob) < _RECORD_FIXED.size + _TAG_LEN or not blob.startswith(RECORD_MAGIC):
            raise ValueError("not a sealed record")
        _, version, key_id, nonce = _RECORD_FIXED.unpack_from(blob)
        if version != FORMAT_VERSION:
            raise ValueError(f"record format {version} is not supported")
        if not hmac.compare_digest(key_id, self.key_id):
            raise ValueError("sealed with another keyring")
        header = blob[: _RECORD_FIXED.size]
        try:
            return self._record_aead.decrypt(nonce, blob[_RECORD_FIXED.size :], header)
        except InvalidTag:
            raise ValueError("failed authentication") from None

    def chain_mac(self, record: bytes) -> bytes:
        return hmac.digest(self._chain_key, record, "sha256")


def _kek(password: str, params: ScryptParams, salt: bytes) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=2**params.log2_n, r=params.r, p=params.p)
    return kdf.derive(password_bytes(password))


def _wrap_aad(key_id: bytes, params: ScryptParams, salt: bytes) -> bytes:
    # The KDF parameters and the key id are authenticated with the wrapped
    # key: editing any of them in the JSON makes unlocking fail.
    return (
        b"authgate keyring v1\0"
        + key_id
        + struct.pack(">BII", params.log2_n, params.r, params.p)
        + salt
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, length: int | None, *, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what} is not base64") from None
    if length is not None and len(raw) != length:
        raise ValueError(f"{what} has the wrong length")
    return raw


def _keyring_document(key_id: bytes, data_key: bytes, password: str, params: ScryptParams) -> bytes:
    params.check()
    salt = secrets.token_bytes(_SALT_LEN)
    nonce = secrets.token_bytes(_NONCE_LEN)
    kek = _kek(password, params, salt)
    wrapped = AESGCM(kek).encrypt(nonce, data_key, _wrap_aad(key_id, params, salt))
    document = {
        "authgate_keyring": KEYRING_VERSION,
        "comment": (
            "authgate data-at-rest keyring: the data key, wrapped with a key derived "
            "from the admin password. Without this file and the password the encrypted "
            "files cannot be read. Keep it with (a backup of) the configuration."
        ),
        "key_id": key_id.hex(),
        "kdf": {
            "name": "scrypt",
            "log2_n": params.log2_n,
            "r": params.r,
            "p": params.p,
            "salt": _b64(salt),
        },
        "wrapped_key": {"cipher": "AES-256-GCM", "nonce": _b64(nonce), "ciphertext": _b64(wrapped)},
    }
    return (json.dumps(document, indent=2) + "\n").encode("ascii")


@dataclass(frozen=True)
class _KeyringFile:
    key_id: bytes
    params: ScryptParams
    salt: bytes
    nonce: bytes
    wrapped: bytes


def _parse_keyring(path: Path) -> _KeyringFile:
    if not path.exists():
        raise AtRestError(
            f"no keyring at {path}: nothing is encrypted (`authgate encrypt` makes one)"
        )
    data = read_bytes(path)
    try:
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        version = doc.get("authgate_keyring")
        if version != KEYRING_VERSION:
            raise AtRestError(
                f"{path}: keyring format {version!r} is not supported by this authgate"
            )
        kdf = doc["kdf"]
        wrapped = doc["wrapped_key"]
        if not isinstance(kdf, dict) or not isinstance(wrapped, dict):
            raise ValueError("kdf/wrapped_key are not objects")
        if kdf.get("name") != "scrypt" or wrapped.get("cipher") != "AES-256-GCM":
            raise ValueError("unknown algorithm")
        log2_n, r, p = kdf.get("log2_n"), kdf.get("r"), kdf.get("p")
        if type(log2_n) is not int or type(r) is not int or type(p) is not int:
            raise ValueError("scrypt parameters are not integers")
        params = ScryptParams(log2_n, r, p)
        params.check()
        key_id_text = doc.get("key_id")
        if not isinstance(key_id_text, str):
            raise ValueError("key_id is not a string")
        key_id = bytes.fromhex(key_id_text)
        if len(key_id) != _KEY_ID_LEN:
            raise ValueError("key_id has the wrong length")
        return _KeyringFile(
            key_id=key_id,
            params=params,
            salt=_unb64(kdf.get("salt"), None, what="salt"),
            nonce=_unb64(wrapped.get("nonce"), _NONCE_LEN, what="nonce"),
            wrapped=_unb64(wrapped.get("ciphertext"), _DATA_KEY_LEN + _TAG_LEN, what="key"),
        )
    except AtRestError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DamagedFile(f"{path} is damaged or was modified") from None


def unlock(config_dir: Path, password: str) -> Keyring:
    """Unwrap the data key of `<config_dir>/authgate.keyring`.

    WrongPassword when the password does not fit. An edited keyring (salt,
    parameters, wrapped key) fails the same authentication check and is
    reported the same way: the two cannot be told apart, by design of GCM."""
    path = keyring_path(config_dir)
    info = _parse_keyring(path)
    kek = _kek(password, info.params, info.salt)
    try:
        data_key = AESGCM(kek).decrypt(
            info.nonce, info.wrapped, _wrap_aad(info.key_id, info.params, info.salt)
        )
    except InvalidTag:
        raise WrongPassword(f"wrong password for {path}") from None
    return Keyring(path, info.key_id, data_key)


def create_keyring(
    config_dir: Path, password: str, *, params: ScryptParams = DEFAULT_SCRYPT
) -> Keyring:
    """Make a new data key and write it, wrapped, to a new keyring file
    (atomically, mode 0600). Refuses to replace an existing keyring: that
    would orphan every file sealed with it."""
    path = keyring_path(config_dir)
    if path.exists():
        raise AtRestError(f"{path} already exists")
    key_id = secrets.token_bytes(_KEY_ID_LEN)
    data_key = secrets.token_bytes(_DATA_KEY_LEN)
    atomic_write(path, _keyring_document(key_id, data_key, password, params))
    return Keyring(path, key_id, data_key)


def rewrap_keyring(
    config_dir: Path, old_password: str, new_password: str, *, params: ScryptParams = DEFAULT_SCRYPT
) -> Keyring:
    """Wrap the same data key under a new password (fresh salt and nonce)
    and replace the keyring atomically. No data file is read or written."""
    path = keyring_path(config_dir)
    info = _parse_keyring(path)
    kek = _kek(old_password, info.params, info.salt)
    try:
        data_key = AESGCM(kek).decrypt(
            info.nonce, info.wrapped, _wrap_aad(info.key_id, info.params, info.salt)
        )
    except InvalidTag:
        raise WrongPassword(f"wrong password for {path}") from None
    like = _stat_or_none(path)
    remove_stale_temps(path)
    atomic_write(path, _keyring_document(info.key_id, data_key, new_password, params), like=like)
    return Keyring(path, info.key_id, data_key)


# ---------------------------------------------------------------- file I/O


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AtRestError(f"cannot read {path}: {exc.strerror or exc}") from None


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def fsync_dir(directory: Path) -> None:
    # A rename is durable only once the directory entry is on disk.
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes, *, like: os.stat_result | None = None) -> None:
    """Replace `path` with `data`: a temporary file in the same directory
    (mode 0600, the old file's owner when we may set it), fsync, rename over
    the target, fsync the directory. A crash at any point leaves the old
    file or the new one, plus at worst a stray `.<name>.*.authgate-tmp`
    that `remove_stale_temps` deletes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o600)
        if like is not None and (like.st_uid, like.st_gid) != (os.geteuid(), os.getegid()):
            # Run as root on a file owned by the proxy's user: keep it readable by them.
            with contextlib.suppress(PermissionError):
                os.fchown(fd, like.st_uid, like.st_gid)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        test_pause()
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    test_pause()
    fsync_dir(path.parent)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temporary files an interrupted `atomic_write(path, ...)` left."""
    path = Path(path)
    pattern = os.path.join(
        glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*{_TMP_SUFFIX}"
    )
    removed = []
    for name in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
            removed.append(Path(name))
    return removed


def is_sealed(data: bytes) -> bool:
    """Whether `data` is a sealed file (by its header; authenticity is
    checked when it is opened)."""
    return data.startswith(FILE_MAGIC)


def open_secret_file(
    path: Path, keyring: Keyring | None, *, allow_plaintext: bool = False
) -> bytes:
    """The plaintext of a secret file, sealed or not.

    - sealed + keyring: decrypted and authenticated (DamagedFile otherwise);
    - sealed, no keyring: Locked (give the password);
    - plaintext, no keyring: returned as is (encryption is off);
    - plaintext + keyring: PlaintextRefused, unless `allow_plaintext`. With
      encryption on, a plaintext users file is either an unfinished
      `authgate encrypt` or one planted to replace the real one; authgate
      must not authenticate against it.
    """
    path = Path(path)
    return unseal_secret(path, read_bytes(path), keyring, allow_plaintext=allow_plaintext)


def unseal_secret(
    path: Path, data: bytes, keyring: Keyring | None, *, allow_plaintext: bool = False
) -> bytes:
    """`open_secret_file` for bytes already read from `path`."""
    if is_sealed(data):
        if keyring is None:
            raise Locked(
                f"{path} is encrypted: give the admin password (--password-file or "
                "AUTHGATE_PASSWORD)"
            )
        return keyring.open_file(path.name, data, source=str(path))
    if keyring is not None and not allow_plaintext:
        raise PlaintextRefused(
            f"{path} is not encrypted although {keyring.path} exists: run `authgate encrypt` "
            "to finish encrypting (or `authgate decrypt` to turn encryption off)"
        )
    return data


def write_secret_file(path: Path, data: bytes, keyring: Keyring | None) -> None:
    """Write a secret file atomically (mode 0600): sealed when a keyring is
    given, plaintext otherwise."""
    path = Path(path)
    blob = keyring.seal_file(path.name, data) if keyring is not None else data
    atomic_write(path, blob, like=_stat_or_none(path))
