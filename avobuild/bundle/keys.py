"""Signing keys and keyrings.

Keys are standard PEM files so that `openssl` and HSM tooling can read and make them: private
keys as PKCS#8 (`-----BEGIN PRIVATE KEY-----`), public keys as SubjectPublicKeyInfo
(`-----BEGIN PUBLIC KEY-----`). A key is named by its key-id, the lowercase hex sha256 of the
DER SubjectPublicKeyInfo (docs/bundle-format.md, "Signature block"), which
`openssl pkey -pubin -outform DER | sha256sum` reproduces.

Supported key types (docs/signing.md, "Algorithms"): Ed25519, ECDSA on P-256 and P-384, and
RSA of at least 3072 bits. The signature algorithm follows from the key, so a key file is all
a signer names. Anything else is refused with a KeyError_ naming the file, never ignored.

A keyring is what a verifier trusts: a PEM file or a directory of `*.pem` files (public keys
and trust-anchor certificates, threshold 1), or a TOML file that lists such files and says how
many distinct trusted signers must have signed (`threshold`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

from avobuild.errors import KeyError_, RecipeError

PrivateKey: TypeAlias = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey

MIN_RSA_BITS = 3072
# Larger keys only cost a verifier time (an attacker's certificate chain, too).
MAX_RSA_BITS = 8192

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL | re.ASCII
)
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
SUPPORTED_KEYS = "ed25519, ecdsa-p256, ecdsa-p384, rsa (3072 to 8192 bits)"


class KeyAlgorithm(StrEnum):
    """A key type; `avobuild keys generate --type` takes these names."""

    ED25519 = "ed25519"
    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    RSA = "rsa"


class CertificateTime(StrEnum):
    """When a certificate must have been valid: now, or at the bundle's build-date."""

    NOW = "now"
    SIGNING = "signing"


@dataclass(frozen=True)
class TrustedKey:
    """A public key from a keyring, with the file it came from (for messages)."""

    key_id: str
    algorithm: KeyAlgorithm
    public_key: PublicKey
    source: Path


@dataclass(frozen=True)
class TrustAnchor:
    """A certificate from a keyring: signer certificates chaining to it are trusted."""

    certificate: x509.Certificate
    source: Path


@dataclass(frozen=True)
class Keyring:
    """What a verifier trusts. `source` is the file or directory it came from.

    `threshold` distinct trusted signers (raw keys, or certificates chaining to an anchor)
    must have signed a bundle's manifest.
    """

    source: Path
    keys: tuple[TrustedKey, ...]
    threshold: int = 1
    anchors: tuple[TrustAnchor, ...] = ()
    certificate_time: CertificateTime = CertificateTime.NOW

    def find(self, key_id: str) -> TrustedKey | None:
        return next((key for key in self.keys if key.key_id == key_id), None)


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


def key_algorithm(key: PrivateKey | PublicKey) -> KeyAlgorithm:
    """The key's type; callers only pass keys that `check_key` accepted."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return KeyAlgorithm.ED25519
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return KeyAlgorithm.RSA
    if isinstance(key.curve, ec.SECP384R1):
        return KeyAlgorithm.ECDSA_P384
    return KeyAlgorithm.ECDSA_P256


def describe_key(key: object) -> str:
    """A key's type for messages: 'RSA-2048', 'ECDSA secp521r1', 'Ed448'."""
    return _describe(key)


def is_supported_key(key: object) -> bool:
    """True for the keys a signer (or a certificate of a chain) may have."""
    return _supported(key)


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


def _supported(key: object) -> bool:
    if isinstance(
        key,
        ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey,
    ):
        return True
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1)
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS
    return False


def check_public_key(key: object, where: str) -> PublicKey:
    """`key` if it is a supported signing key, else a KeyError_ naming `where`."""
    if not _supported(key):
        raise _unsupported(where, key)
    assert isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key


def _unsupported(where: str | Path, key: object) -> KeyError_:
    return KeyError_(
        f"{where}: {_describe(key)} keys are not supported (supported: {SUPPORTED_KEYS}); "
        "make one with 'avobuild keys generate --type TYPE'"
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise KeyError_(f"{path}: cannot read {what}: {error.strerror or error}") from None


def _pem_labels(data: bytes) -> list[str]:
    return [match.group(1).decode("ascii") for match in _PEM_BLOCK.finditer(data)]


def load_private_key(path: Path, password: bytes | None = None) -> PrivateKey:
    """Load a PEM PKCS#8 private signing key of a supported type."""
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
    if not _supported(key):
        raise _unsupported(path, key)
    assert isinstance(
        key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    )
    return key


def _load_public_block(path: Path, block: bytes, number: int) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(block)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyError_(f"{path}: PEM block {number} is not a readable public key") from None
    return check_public_key(key, str(path))


def load_certificate_block(path: Path, block: bytes, number: int) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(block)
    except (ValueError, x509.InvalidVersion):
        raise KeyError_(f"{path}: PEM block {number} is not a readable X.509 certificate") from None


def _load_trust_file(path: Path) -> tuple[list[PublicKey], list[x509.Certificate]]:
    """The public keys and certificates of one PEM file, in file order."""
    data = _read(path, "public key")
    keys: list[PublicKey] = []
    certificates: list[x509.Certificate] = []
    for number, match in enumerate(_PEM_BLOCK.finditer(data), start=1):
        label = match.group(1).decode("ascii")
        if label == "PUBLIC KEY":
            keys.append(_load_public_block(path, match.group(0), number))
        elif label == "CERTIFICATE":
            certificates.append(load_certificate_block(path, match.group(0), number))
        elif "PRIVATE KEY" in label:
            raise KeyError_(
                f"{path}: PEM block {number} is a private key; a keyring and a public key file "
                "must hold only public keys (use the .pub.pem file)"
            )
        else:
            raise KeyError_(
                f"{path}: PEM block {number} is a {label!r}, expected 'PUBLIC KEY' or 'CERTIFICATE'"
            )
    if not keys and not certificates:
        raise KeyError_(
            f"{path}: no PEM public key or certificate found "
            "(expected '-----BEGIN PUBLIC KEY-----' or '-----BEGIN CERTIFICATE-----')"
        )
    return keys, certificates


def load_public_key(path: Path) -> PublicKey:
    """Load a PEM file holding exactly one public key, or one certificate (its key)."""
    keys, certificates = _load_trust_file(path)
    if len(keys) + len(certificates) != 1:
        raise KeyError_(
            f"{path}: holds {len(keys)} public keys and {len(certificates)} certificates, "
            "expected exactly one"
        )
    if keys:
        return keys[0]
    return check_public_key(certificates[0].public_key(), f"{path}: certificate")


def load_certificates(path: Path) -> list[x509.Certificate]:
    """All certificates of a PEM file (a signer certificate, then its intermediates)."""
    _, certificates = _load_trust_file(path)
    if not certificates:
        raise KeyError_(f"{path}: no certificate found (expected '-----BEGIN CERTIFICATE-----')")
    return certificates


def load_signer_identity(path: Path) -> tuple[PublicKey, list[x509.Certificate]]:
    """A public key file, or a certificate file (signer first, then intermediates)."""
    data = path.read_bytes() if path.is_file() else b""
    if b"-----BEGIN CERTIFICATE-----" in data:
        certificates = load_certificates(path)
        public_key = check_public_key(certificates[0].public_key(), f"{path}: certificate 1")
        return public_key, certificates
    return load_public_key(path), []


def load_keyring(path: Path) -> Keyring:
    """Load a keyring: a PEM file, a directory of *.pem files, or a TOML keyring file."""
    if path.is_dir():
        files = sorted(entry for entry in path.glob("*.pem") if entry.is_file())
        if not files:
            raise KeyError_(f"{path}: keyring directory holds no *.pem file")
        return _keyring_of(path, files)
    if not path.exists():
        raise KeyError_(f"{path}: keyring not found")
    if path.suffix == ".toml":
        return _load_toml_keyring(path)
    return _keyring_of(path, [path])


def _keyring_of(
    source: Path,
    files: list[Path],
    threshold: int = 1,
    certificate_time: CertificateTime = CertificateTime.NOW,
) -> Keyring:
    keys: list[TrustedKey] = []
    anchors: list[TrustAnchor] = []
    seen: set[str] = set()
    seen_anchors: set[bytes] = set()
    for file in files:
        public_keys, certificates = _load_trust_file(file)
        for public_key in public_keys:
            identifier = key_id(public_key)
            if identifier not in seen:
                seen.add(identifier)
                keys.append(TrustedKey(identifier, key_algorithm(public_key), public_key, file))
        for certificate in certificates:
            fingerprint = certificate.public_bytes(serialization.Encoding.DER)
            if fingerprint not in seen_anchors:
                seen_anchors.add(fingerprint)
                anchors.append(TrustAnchor(certificate, file))
    if not anchors and threshold > len(keys):
        raise KeyError_(
            f"{source}: threshold {threshold} can never be met by {len(keys)} trusted key(s)"
        )
    return Keyring(source, tuple(keys), threshold, tuple(anchors), certificate_time)


def _load_toml_keyring(path: Path) -> Keyring:
    from avobuild.model.tomlcheck import load_toml

    try:
        table = load_toml(path)
        threshold = table.integer("threshold", default=1, minimum=1)
        names = table.string_list("keys")
        if not names:
            table.fail("keys", "a non-empty list of PEM files (public keys or certificates)")
        certificate_time = table.enum(
            "certificate-time", CertificateTime, default=CertificateTime.NOW
        )
        table.check_unknown()
    except RecipeError as error:
        raise KeyError_(str(error)) from None
    files = [(path.parent / name) for name in names]
    for file in files:
        if not file.is_file():
            raise KeyError_(f"{path}: keys: {file}: no such file")
    return _keyring_of(path, files, threshold, certificate_time)


def generate_private_key(algorithm: KeyAlgorithm, rsa_bits: int = MIN_RSA_BITS) -> PrivateKey:
    if algorithm is KeyAlgorithm.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm is KeyAlgorithm.ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm is KeyAlgorithm.ECDSA_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if not MIN_RSA_BITS <= rsa_bits <= MAX_RSA_BITS:
        raise KeyError_(
            f"RSA keys need at least {MIN_RSA_BITS} bits (and at most {MAX_RSA_BITS}), "
            f"got {rsa_bits}"
        )
    return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)


def generate_keypair(
    directory: Path,
    name: str = "bundle-signing",
    algorithm: KeyAlgorithm = KeyAlgorithm.ED25519,
    rsa_bits: int = MIN_RSA_BITS,
) -> tuple[Path, Path]:
    """Write a new key pair as `<name>.key.pem` (mode 0600) and `<name>.pub.pem`.

    Existing files are never overwritten: losing a signing key strands a fleet.
    """
    if not _KEY_NAME.fullmatch(name):
        raise KeyError_(f"key name: expected letters, digits, '.', '_' or '-', got {name!r}")
    private_path = directory / f"{name}.key.pem"
    public_path = directory / f"{name}.pub.pem"
    for existing in (private_path, public_path):
        if existing.exists():
            raise KeyError_(f"{existing}: already exists; refusing to overwrite a key")
    private_key = generate_private_key(algorithm, rsa_bits)
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
