"""The signature block: signatures over the exact manifest bytes, and their verification.

Specified in docs/bundle-format.md, section 4, and docs/signing.md. The block is not itself
signed, so it may only ever add evidence: lines a reader does not understand (a signature with
an algorithm it lacks, a future keyword) are kept and skipped, which can make verification
fail but never pass. Everything that restricts or directs an installation lives in the signed
manifest instead.

Trust rule: at least `keyring.threshold` distinct trusted signers must have a signature that
verifies, where a signer is trusted when its key is in the keyring or when the block carries a
certificate for it that chains to one of the keyring's trust anchors. A signature by a trusted
key that does not verify is a hard failure, since it can only be tampering or a signature
moved from another manifest.

Every algorithm is one `openssl` can check on the manifest bytes (docs/signing.md lists the
commands): pure Ed25519, ECDSA with a DER signature over SHA-256 (P-256) or SHA-384 (P-384),
and RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from avobuild.bundle.keys import (
    KeyAlgorithm,
    PrivateKey,
    PublicKey,
    key_algorithm,
    key_id,
)
from avobuild.errors import SignatureError, shown

SIGNATURES_VERSION = 1
MAX_SIGNATURE_BLOCK_SIZE = 1 << 20
ED25519_SIGNATURE_SIZE = 64
PSS_SALT_LENGTH = 32
# What a reader considers before authentication is bounded (docs/bundle-format.md 4.2), so
# a hostile block costs about what an honest one does: lines after the first, the length of
# a line (a 16 KiB certificate in base64 fits), and lines of each kind.
MAX_BLOCK_LINES = 256
MAX_LINE_SIZE = 22 << 10
MAX_SIGNATURES = 32
# Certificates a block may carry: a signer certificate and its intermediates, per signer.
MAX_CERTIFICATES = 32
MAX_CERTIFICATE_SIZE = 16 << 10
MAX_RECIPIENTS = 128

_KEYWORD = re.compile(r"[a-z][a-z0-9-]{0,31}", re.ASCII)
_ALGORITHM = re.compile(r"[a-z0-9][a-z0-9-]{0,63}", re.ASCII)
_FIELD = re.compile(r"[!-~]+", re.ASCII)
_KEY_ID = re.compile(r"[0-9a-f]{64}", re.ASCII)


class SignatureAlgorithm(StrEnum):
    ED25519 = "ed25519"
    ECDSA_P256_SHA256 = "ecdsa-p256-sha256"
    ECDSA_P384_SHA384 = "ecdsa-p384-sha384"
    RSA_PSS_SHA256 = "rsa-pss-sha256"


SUPPORTED_ALGORITHMS = frozenset(member.value for member in SignatureAlgorithm)

ALGORITHM_OF_KEY = {
    KeyAlgorithm.ED25519: SignatureAlgorithm.ED25519,
    KeyAlgorithm.ECDSA_P256: SignatureAlgorithm.ECDSA_P256_SHA256,
    KeyAlgorithm.ECDSA_P384: SignatureAlgorithm.ECDSA_P384_SHA384,
    KeyAlgorithm.RSA: SignatureAlgorithm.RSA_PSS_SHA256,
}

# The largest DER ECDSA-Sig-Value: two INTEGERs of the curve size plus a sign byte each.
_ECDSA_MAX_DER = {
    SignatureAlgorithm.ECDSA_P256_SHA256: 72,
    SignatureAlgorithm.ECDSA_P384_SHA384: 104,
}


def signature_algorithm(key: PrivateKey | PublicKey) -> SignatureAlgorithm:
    """The one signature algorithm avobuild uses with `key`."""
    return ALGORITHM_OF_KEY[key_algorithm(key)]


def pss_padding() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)


def sign_data(private_key: PrivateKey, data: bytes) -> bytes:
    """A signature over `data` in the encoding the signature block carries."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(data, pss_padding(), hashes.SHA256())
    digest = hashes.SHA384() if isinstance(private_key.curve, ec.SECP384R1) else hashes.SHA256()
    return low_s(signature_algorithm(private_key), private_key.sign(data, ec.ECDSA(digest)))


def verify_data(
    algorithm: SignatureAlgorithm, public_key: PublicKey, signature: bytes, data: bytes
) -> bool:
    """True if `signature` is `algorithm`'s signature over `data` by `public_key`."""
    if signature_algorithm(public_key) is not algorithm:
        return False
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        elif isinstance(public_key, rsa.RSAPublicKey):
            if len(signature) != (public_key.key_size + 7) // 8:
                return False
            public_key.verify(signature, data, pss_padding(), hashes.SHA256())
        else:
            digest = (
                hashes.SHA384() if isinstance(public_key.curve, ec.SECP384R1) else hashes.SHA256()
            )
            public_key.verify(signature, data, ec.ECDSA(digest))
    except InvalidSignature:
        return False
    return True


class Signer(Protocol):
    """Anything that signs manifest bytes: a key file, an HSM key."""

    @property
    def algorithm(self) -> SignatureAlgorithm: ...

    @property
    def key_id(self) -> str: ...

    @property
    def public_key(self) -> PublicKey: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class KeySigner:
    """A signer holding its private key in memory (a PEM key file)."""

    private_key: PrivateKey

    @property
    def algorithm(self) -> SignatureAlgorithm:
        return signature_algorithm(self.private_key)

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        return sign_data(self.private_key, data)


@dataclass(frozen=True)
class SignatureEntry:
    """One `signature` line. `algorithm` stays a string: unknown ones are kept, not refused."""

    algorithm: str
    key_id: str
    signature: bytes

    @property
    def supported(self) -> bool:
        return self.algorithm in SUPPORTED_ALGORITHMS


@dataclass(frozen=True)
class CertificateEntry:
    """One `certificate` line: a DER X.509 certificate for the key `key_id`."""

    key_id: str
    der: bytes


@dataclass(frozen=True)
class SignatureBlock:
    """The parsed signature block. `extra_lines` are lines of kinds this version skips."""

    signatures: tuple[SignatureEntry, ...]
    extra_lines: tuple[str, ...] = ()
    certificates: tuple[CertificateEntry, ...] = ()

    def with_signature(self, entry: SignatureEntry) -> SignatureBlock:
        """This block with `entry` added, replacing any signature by the same key."""
        kept = tuple(other for other in self.signatures if other.key_id != entry.key_id)
        return SignatureBlock((*kept, entry), self.extra_lines, self.certificates)

    def with_certificates(self, entries: Sequence[CertificateEntry]) -> SignatureBlock:
        """This block with `entries` added (certificates already present are not repeated)."""
        certificates = list(self.certificates)
        for entry in entries:
            if entry not in certificates:
                certificates.append(entry)
        return SignatureBlock(self.signatures, self.extra_lines, tuple(certificates))


@dataclass(frozen=True)
class VerifiedSigner:
    """A trusted signer whose signature over the manifest verified."""

    key_id: str
    algorithm: SignatureAlgorithm
    source: Path
    # The subject of the signer's certificate when trust came from a certificate chain.
    certificate_subject: str | None = None


def sign_manifest(manifest_bytes: bytes, private_key: PrivateKey) -> SignatureBlock:
    """A signature block holding one signature over `manifest_bytes` by `private_key`."""
    return sign_manifest_with(manifest_bytes, [KeySigner(private_key)])


def sign_manifest_with(
    manifest_bytes: bytes,
    signers: Sequence[Signer],
    certificates: Sequence[CertificateEntry] = (),
) -> SignatureBlock:
    """A signature block with one signature per signer (and the given certificates)."""
    block = SignatureBlock(signatures=())
    for signer in signers:
        block = block.with_signature(make_signature(manifest_bytes, signer))
    return block.with_certificates(certificates)


def make_signature(manifest_bytes: bytes, signer: Signer) -> SignatureEntry:
    return SignatureEntry(signer.algorithm.value, signer.key_id, signer.sign(manifest_bytes))


def render_signature_block(block: SignatureBlock) -> bytes:
    lines = [f"avobuild-signatures {SIGNATURES_VERSION}"]
    lines.extend(
        f"signature {entry.algorithm} {entry.key_id} {base64.b64encode(entry.signature).decode()}"
        for entry in block.signatures
    )
    lines.extend(
        f"certificate {entry.key_id} {base64.b64encode(entry.der).decode()}"
        for entry in block.certificates
    )
    lines.extend(block.extra_lines)
    data = "".join(line + "\n" for line in lines).encode("ascii")
    parsed = parse_signature_block(data)
    if parsed != block:
        raise SignatureError(
            "invalid signature block: it does not survive a render/parse round trip"
        )
    return data


def parse_signature_block(data: bytes) -> SignatureBlock:
    """Parse signature block bytes; every error is a SignatureError naming the line."""
    if len(data) > MAX_SIGNATURE_BLOCK_SIZE:
        raise SignatureError(
            f"signature block is {len(data)} bytes, over the limit of {MAX_SIGNATURE_BLOCK_SIZE}"
        )
    # Counted before anything is decoded or split, so a block of many tiny lines is refused
    # for the price of one pass over its bytes.
    line_count = data.count(b"\n")
    if line_count > MAX_BLOCK_LINES + 1:
        raise SignatureError(
            f"signature block has {line_count - 1} lines after the first, more than the "
            f"{MAX_BLOCK_LINES} a reader considers"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as error:
        number = data.count(b"\n", 0, error.start) + 1
        raise SignatureError(
            f"signature block line {number}: byte 0x{data[error.start]:02x} is not ASCII"
        ) from None
    if not text.endswith("\n"):
        raise SignatureError(
            f"signature block line {text.count(chr(10)) + 1}: not terminated by a newline"
        )
    signatures: list[SignatureEntry] = []
    certificates: list[CertificateEntry] = []
    extra: list[str] = []
    signers: set[str] = set()
    certificate_ders: set[bytes] = set()
    recipients = 0
    for number, line in enumerate(text[:-1].split("\n"), start=1):
        try:
            if len(line) + 1 > MAX_LINE_SIZE:
                raise SignatureError(
                    f"{len(line) + 1} bytes, over the line limit of {MAX_LINE_SIZE}"
                )
            fields = _split(line)
            if number == 1:
                _check_first_line(fields)
            elif fields[0] == "signature":
                if len(signatures) == MAX_SIGNATURES:
                    raise SignatureError(f"more than {MAX_SIGNATURES} signatures")
                entry = _parse_signature(fields)
                if entry.key_id in signers:
                    raise SignatureError(f"a second signature by key {entry.key_id}")
                signers.add(entry.key_id)
                signatures.append(entry)
            elif fields[0] == "certificate":
                if len(certificates) == MAX_CERTIFICATES:
                    raise SignatureError(f"more than {MAX_CERTIFICATES} certificates")
                certificate = _parse_certificate(fields)
                if certificate.der in certificate_ders:
                    raise SignatureError("the same certificate twice (identical DER bytes)")
                certificate_ders.add(certificate.der)
                certificates.append(certificate)
            else:
                if fields[0] == "recipient":
                    recipients += 1
                    if recipients > MAX_RECIPIENTS:
                        raise SignatureError(f"more than {MAX_RECIPIENTS} recipients")
                extra.append(line)
        except SignatureError as error:
            raise SignatureError(f"signature block line {number}: {error}") from None
    return SignatureBlock(tuple(signatures), tuple(extra), tuple(certificates))


def _split(line: str) -> list[str]:
    if not line:
        raise SignatureError("empty line")
    fields = line.split(" ")
    if "" in fields:
        raise SignatureError("fields must be separated by exactly one space, with none at the ends")
    if not _KEYWORD.fullmatch(fields[0]):
        raise SignatureError(f"expected a keyword matching [a-z][a-z0-9-]*, got {shown(fields[0])}")
    for field in fields[1:]:
        if not _FIELD.fullmatch(field):
            raise SignatureError(f"field {shown(field)} holds a control character")
    return fields


def _check_first_line(fields: list[str]) -> None:
    if fields[0] != "avobuild-signatures" or len(fields) != 2:
        raise SignatureError(
            f"expected 'avobuild-signatures {SIGNATURES_VERSION}', got {shown(' '.join(fields))}"
        )
    if fields[1] != str(SIGNATURES_VERSION):
        raise SignatureError(
            f"unsupported signature block version {shown(fields[1])} "
            f"(this avobuild reads version {SIGNATURES_VERSION})"
        )


def _canonical_base64(what: str, encoded: str) -> bytes:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    # Only the canonical spelling is accepted, so that every byte of the block matters.
    if not raw or base64.b64encode(raw).decode("ascii") != encoded:
        raise SignatureError(f"{what}: expected canonical base64 (RFC 4648, with padding)")
    return raw


def _check_key_id(what: str, identifier: str) -> str:
    if not _KEY_ID.fullmatch(identifier):
        raise SignatureError(
            f"{what}: key-id: expected 64 lowercase hex digits, got {shown(identifier)}"
        )
    return identifier


def _parse_signature(fields: list[str]) -> SignatureEntry:
    if len(fields) != 4:
        raise SignatureError(
            f"signature: expected 3 values (algorithm, key-id, base64 signature), "
            f"got {len(fields) - 1}"
        )
    _, algorithm, identifier, encoded = fields
    if not _ALGORITHM.fullmatch(algorithm):
        raise SignatureError(f"signature: algorithm {shown(algorithm)} is not a valid name")
    _check_key_id("signature", identifier)
    raw = _canonical_base64("signature", encoded)
    if algorithm == SignatureAlgorithm.ED25519 and len(raw) != ED25519_SIGNATURE_SIZE:
        raise SignatureError(
            f"signature: an ed25519 signature is {ED25519_SIGNATURE_SIZE} bytes, got {len(raw)}"
        )
    if algorithm in _ECDSA_MAX_DER:
        _check_ecdsa_der(algorithm, raw)
    return SignatureEntry(algorithm=algorithm, key_id=identifier, signature=raw)


def _is_canonical_der(signature: bytes) -> bool:
    """True when `signature` is an ECDSA-Sig-Value in DER, encoded the one canonical way."""
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        return False
    return encode_dss_signature(r, s) == signature


def _check_ecdsa_der(algorithm: str, raw: bytes) -> None:
    """An ECDSA signature must be canonical DER with a low s, so that it has one spelling and
    no byte of it can change unnoticed ((r, n - s) verifies just as (r, s) does)."""
    known = SignatureAlgorithm(algorithm)
    if not _is_canonical_der(raw) or len(raw) > _ECDSA_MAX_DER[known]:
        raise SignatureError(
            f"signature: an {algorithm} signature must be a DER ECDSA-Sig-Value "
            "(SEQUENCE of two INTEGERs, as 'openssl dgst -sign' writes it)"
        )
    r, s = decode_dss_signature(raw)
    order = _CURVE_ORDER[known]
    if not 1 <= r < order or not 1 <= s < order:
        raise SignatureError(f"signature: an {algorithm} signature needs 1 <= r, s < n")
    if s > order // 2:
        raise SignatureError(
            f"signature: an {algorithm} signature must use the low s (s <= n/2, the spelling "
            "avobuild writes; (r, n - s) is the same signature)"
        )


# The order n of the base point of each curve (SEC 2, 2.4.2 and 2.5.1).
_CURVE_ORDER = {
    SignatureAlgorithm.ECDSA_P256_SHA256: int(
        "FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16
    ),
    SignatureAlgorithm.ECDSA_P384_SHA384: int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
}


def low_s(algorithm: SignatureAlgorithm, signature: bytes) -> bytes:
    """The low-s spelling of a DER ECDSA signature: s replaced by n - s when s > n/2."""
    r, s = decode_dss_signature(signature)
    order = _CURVE_ORDER[algorithm]
    return encode_dss_signature(r, order - s) if s > order // 2 else signature


def _parse_certificate(fields: list[str]) -> CertificateEntry:
    if len(fields) != 3:
        raise SignatureError(
            f"certificate: expected 2 values (key-id, base64 DER certificate), "
            f"got {len(fields) - 1}"
        )
    identifier = _check_key_id("certificate", fields[1])
    der = _canonical_base64("certificate", fields[2])
    if len(der) > MAX_CERTIFICATE_SIZE:
        raise SignatureError(
            f"certificate: {len(der)} bytes, over the limit of {MAX_CERTIFICATE_SIZE}"
        )
    return CertificateEntry(identifier, der)


_ECDSA_RAW_HALF = {
    SignatureAlgorithm.ECDSA_P256_SHA256: 32,
    SignatureAlgorithm.ECDSA_P384_SHA384: 48,
}


def raw_ecdsa_to_der(algorithm: SignatureAlgorithm, signature: bytes) -> bytes:
    """A raw r||s ECDSA signature (what PKCS#11 CKM_ECDSA returns) as DER, with a low s."""
    size = _ECDSA_RAW_HALF[algorithm]
    if len(signature) != 2 * size:
        raise SignatureError(
            f"a raw {algorithm} signature is {2 * size} bytes (r||s), got {len(signature)}"
        )
    der = encode_dss_signature(
        int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    )
    return low_s(algorithm, der)


def to_der_signature(algorithm: SignatureAlgorithm, signature: bytes) -> bytes:
    """The stored spelling of an ECDSA signature made elsewhere: DER with a low s. It may come
    as DER (openssl, high or low s) or raw r||s (JOSE, some HSM tools): a signature of the raw
    length that is not canonical DER is converted. (A raw r||s may well begin with 0x30, the
    DER SEQUENCE tag, so the first byte alone decides nothing.) Others are returned as given."""
    size = _ECDSA_RAW_HALF.get(algorithm)
    if size is None:
        return signature
    if _is_canonical_der(signature):
        return low_s(algorithm, signature)
    if len(signature) == 2 * size:
        return raw_ecdsa_to_der(algorithm, signature)
    return signature


# Looks up the manifest's build-date once the manifest bytes are authenticated by a signer;
# needed only to judge certificates at signing time.
SigningTime = Callable[[], int]
