"""Ed25519 keys and signatures (light core: stdlib + cryptography only).

Guarantees: a private key file is written with mode 0600 and never printed; one that group or others may read
or write is refused on load (:func:`check_private_key_file`, also used for TLS client keys); ``verify_signature`` raises
:class:`SignatureError` for every mismatch and returns nothing on success; Ed25519 is deterministic, so the
same key and bytes give the same signature (artifacts stay byte-reproducible).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeops.errors import KeyFileError, OutputError, SignatureError

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "check_private_key_file",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign",
    "verify_signature",
]

PRIVATE_KEY_NAME = "signing.key"
PUBLIC_KEY_NAME = "signing.pub"


def generate_keypair(directory: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``signing.key`` (PKCS#8 PEM, mode 0600) and ``signing.pub`` into ``directory``.

    Raises OutputError when the directory cannot be written or a key exists and ``overwrite`` is false.
    """
    priv_path, pub_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise OutputError(f"{priv_path} already exists (refusing to overwrite a signing key)")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(priv_pem)
        os.chmod(priv_path, 0o600)
        pub_path.write_bytes(pub_pem)
    except OSError as exc:
        raise OutputError(f"cannot write keys to {directory}: {exc.strerror}") from exc
    return priv_path, pub_path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc


def check_private_key_file(path: Path) -> None:
    """Refuse a private key file that its group or others may read or write (``mode & 0o077``).

    Raises KeyFileError naming the file, its mode and the fix (``chmod 600``), or when it is missing. The key's
    bytes are never read here, so they cannot end up in the message."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise KeyFileError(f"private key not found: {path}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot stat private key {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise KeyFileError(f"private key {path} is accessible by group or others (mode {mode:04o}); "
                           f"run `chmod 600 {path}`")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM). Raises KeyFileError when missing, unreadable, readable or writable by
    group or others (see :func:`check_private_key_file`), or not Ed25519."""
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    check_private_key_file(path)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM). Raises KeyFileError when missing, unreadable or not Ed25519."""
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key's id: hex sha256 of its raw 32 public bytes (as TUF does for ed25519 keys)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data`` (deterministic)."""
    return private_key.sign(data)


def verify_signature(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> None:
    """Raise SignatureError unless ``signature`` is ``public_key``'s signature of ``data``."""
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        raise SignatureError("signature does not match the manifest (tampered, or signed by another key)") from None
