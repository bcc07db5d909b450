"""Signing keys and keyrings.

Keys are standard PEM files so that `openssl` and HSM tooling can read and make them: private
keys as PKCS#8 (`-----BEGIN PRIVATE KEY-----`), public keys as SubjectPublicKeyInfo
(`-----BEGIN PUBLIC KEY-----`). A key is named by its key-id, the lowercase hex sha256 of the
DER SubjectPublicKeyInfo (docs/bundle-format.md, "Signature block"), which
`openssl pkey -pubin -outform DER | sha256sum` reproduces.

Only Ed25519 is supported so far; other key types are refused with a KeyError_ naming the
file, never silently ignored.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

from avobuild.errors import KeyError_

PrivateKey: TypeAlias = ed25519.Ed25519PrivateKey
PublicKey: TypeAlias = ed25519.Ed25519PublicKey

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL | re.ASCII
)
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)


class KeyAlgorithm(StrEnum):
    ED25519 = "ed25519"


@dataclass(frozen=True)
class TrustedKey:
    """A public key from a keyring, with the file it came from (for messages)."""

    key_id: str
    algorithm: KeyAlgorithm
    public_key: PublicKey
    source: Path


@dataclass(frozen=True)
class Keyring:
    """The public keys a verifier trusts. `source` is the file or directory they came from."""

    source: Path
    keys: tuple[TrustedKey, ...]

    def find(self, key_id: str) -> TrustedKey | None:
        return next((key for key in self.keys if key.key_id == key_id), None)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(key.key_id for key in self.keys)


def key_id(public_key: PublicKey) -> str:
    """Lowercase hex sha256 of the key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def public_key_pem(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _describe(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, x25519.X25519PrivateKey | x25519.X25519PublicKey):
        return "X25519 (a key-agreement key, not a signing key)"
    if isinstance(key, x448.X448PrivateKey | x448.X448PublicKey):
        return "X448 (a key-agreement key, not a signing key)"
    if isinstance(key, dsa.DSAPrivateKey | dsa.DSAPublicKey):
        return "DSA"
    return type(key).__name__


def _unsupported(path: Path, key: object) -> KeyError_:
    return KeyError_(
        f"{path}: {_describe(key)} keys are not supported (supported: ed25519); "
        "make one with 'avobuild keys generate' or 'openssl genpkey -algorithm ed25519'"
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise KeyError_(f"{path}: cannot read {what}: {error.strerror or error}") from None


def _pem_labels(data: bytes) -> list[str]:
    return [match.group(1).decode("ascii") for match in _PEM_BLOCK.finditer(data)]


def load_private_key(path: Path, password: bytes | None = None) -> PrivateKey:
    """Load a PEM PKCS#8 private signing key."""
    data = _read(path, "private key")
    labels = _pem_labels(data)
    if "PUBLIC KEY" in labels and not any("PRIVATE KEY" in label for label in labels):
        raise KeyError_(
            f"{path}: holds a public key; signing needs the private key (the .key.pem file)"
        )
    if "OPENSSH PRIVATE KEY" in labels:
        raise KeyError_(
            f"{path}: is an OpenSSH key; convert it to PKCS#8 PEM "
            "(ssh-keygen -p -m PKCS8 -f FILE) or make a new one with 'avobuild keys generate'"
        )
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        if password is None:
            raise KeyError_(
                f"{path}: the private key is encrypted and no passphrase was given"
            ) from None
        raise KeyError_(f"{path}: a passphrase was given but the key is not encrypted") from None
    except UnsupportedAlgorithm as error:
        raise KeyError_(f"{path}: unsupported private key algorithm: {error}") from None
    except ValueError:
        raise KeyError_(
            f"{path}: not a readable PEM private key (expected '-----BEGIN PRIVATE KEY-----', "
            "PKCS#8), or the passphrase is wrong"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise _unsupported(path, key)
    return key


def _load_public_block(path: Path, block: bytes, number: int) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(block)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyError_(f"{path}: PEM block {number} is not a readable public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise _unsupported(path, key)
    return key


def _load_public_blocks(path: Path) -> list[PublicKey]:
    data = _read(path, "public key")
    keys: list[PublicKey] = []
    for number, match in enumerate(_PEM_BLOCK.finditer(data), start=1):
        label = match.group(1).decode("ascii")
        if label == "PUBLIC KEY":
            keys.append(_load_public_block(path, match.group(0), number))
        elif "PRIVATE KEY" in label:
            raise KeyError_(
                f"{path}: PEM block {number} is a private key; a keyring and a public key file "
                "must hold only public keys (use the .pub.pem file)"
            )
        elif label == "CERTIFICATE":
            raise KeyError_(
                f"{path}: PEM block {number} is a certificate; certificates are not supported "
                "yet, give the signer's public key ('openssl x509 -pubkey -noout')"
            )
        else:
            raise KeyError_(f"{path}: PEM block {number} is a {label!r}, expected 'PUBLIC KEY'")
    if not keys:
        raise KeyError_(f"{path}: no PEM public key found (expected '-----BEGIN PUBLIC KEY-----')")
    return keys


def load_public_key(path: Path) -> PublicKey:
    """Load a PEM file holding exactly one public key."""
    keys = _load_public_blocks(path)
    if len(keys) != 1:
        raise KeyError_(f"{path}: holds {len(keys)} public keys, expected exactly one")
    return keys[0]


def load_keyring(path: Path) -> Keyring:
    """Load trusted public keys from a PEM file (one or more keys) or a directory of *.pem."""
    if path.is_dir():
        files = sorted(entry for entry in path.glob("*.pem") if entry.is_file())
        if not files:
            raise KeyError_(f"{path}: keyring directory holds no *.pem file")
    elif path.exists():
        files = [path]
    else:
        raise KeyError_(f"{path}: keyring not found")
    keys: list[TrustedKey] = []
    seen: set[str] = set()
    for file in files:
        for public_key in _load_public_blocks(file):
            identifier = key_id(public_key)
            if identifier not in seen:
                seen.add(identifier)
                keys.append(TrustedKey(identifier, KeyAlgorithm.ED25519, public_key, file))
    return Keyring(source=path, keys=tuple(keys))


def generate_keypair(directory: Path, name: str = "bundle-signing") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as `<name>.key.pem` (mode 0600) and `<name>.pub.pem`.

    Existing files are never overwritten: losing a signing key strands a fleet.
    """
    if not _KEY_NAME.fullmatch(name):
        raise KeyError_(f"key name: expected letters, digits, '.', '_' or '-', got {name!r}")
    private_path = directory / f"{name}.key.pem"
    public_path = directory / f"{name}.pub.pem"
    for existing in (private_path, public_path):
        if existing.exists():
            raise KeyError_(f"{existing}: already exists; refusing to overwrite a key")
    private_key = ed25519.Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            # The umask can only remove bits; fchmod makes the mode exactly 0600 regardless.
            os.fchmod(handle.fileno(), 0o600)
            handle.write(private_pem)
        with public_path.open("xb") as handle:
            handle.write(public_key_pem(private_key.public_key()))
    except OSError as error:
        raise KeyError_(
            f"{error.filename or directory}: cannot write key: {error.strerror or error}"
        ) from None
    return private_path, public_path
