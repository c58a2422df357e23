"""Encryption at rest for the files authgate keeps secrets in.

What is protected: the users file, the backends' master password files and
the audit log (`authgate encrypt -c CONFIG` finds them in the config).
How: a random data key seals each file with AES-256-GCM (file name in the
associated data, so files cannot be swapped); the data key is wrapped with
a key derived from the admin password by scrypt, in
`<config dir>/authgate.keyring` (mode 0600). See `envelope` for the
formats, `convert` for the crash-safe in-place conversion and
`authgate.audit` for the log.

Improvements over the usual "data encryption" switch (the brief's Kerio
text): the password can be changed (`rekey` re-wraps 32 bytes, no data is
rewritten); an interrupted encrypt or decrypt never corrupts anything and
is finished by running it again; nothing is tied to a disk or machine
(moving the files, the keyring and knowing the password is enough).

Limits, stated plainly: files replaced in place on a journaling file
system or SSD may leave the old plaintext in free blocks, so rotate the
secrets after first encrypting if that matters; the TLS private key is not
covered (the ssl module loads keys from a path; use an encrypted PEM key);
a running proxy holds the data key in memory.

Test hooks (off unless set; never for real use, the commands warn when
they are): AUTHGATE_TEST_SLOW_IO=<ms> sleeps between conversion steps so a
test can kill a run mid-way; AUTHGATE_TEST_SCRYPT_LOG2N=<10..16> makes new
keyrings with a cheap scrypt. See `envelope`.

For the proxy: `unlock(config_dir, password)` -> `Keyring`;
`open_secret_file(path, keyring)` -> plaintext bytes;
`write_secret_file(path, data, keyring)`; `authgate.audit.AuditLog`.
"""

from __future__ import annotations

from authgate.atrest.envelope import (
    KEYRING_NAME,
    AtRestError,
    DamagedFile,
    Keyring,
    Locked,
    PlaintextRefused,
    ScryptParams,
    WrongPassword,
    create_keyring,
    is_sealed,
    keyring_path,
    open_secret_file,
    rewrap_keyring,
    unlock,
    write_secret_file,
)

__all__ = [
    "KEYRING_NAME",
    "AtRestError",
    "DamagedFile",
    "Keyring",
    "Locked",
    "PlaintextRefused",
    "ScryptParams",
    "WrongPassword",
    "create_keyring",
    "is_sealed",
    "keyring_path",
    "open_secret_file",
    "rewrap_keyring",
    "unlock",
    "write_secret_file",
]
