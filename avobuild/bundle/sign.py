"""The signature block: signatures over the exact manifest bytes, and their verification.

Specified in docs/bundle-format.md, section "Signature block". The block is not itself signed,
so it may only ever add evidence: lines a reader does not understand (a future `certificate`
line, a signature with an algorithm it lacks) are kept and skipped, which can make
verification fail but never pass. Everything that restricts or directs an installation lives
in the signed manifest instead.

Trust rule (version 1): at least one signature must verify with a key from the keyring, and a
signature that names a trusted key but does not verify is a hard failure, since it can only be
tampering or a signature moved from another manifest.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from avobuild.bundle.keys import Keyring, PrivateKey, key_id
from avobuild.errors import SignatureError

SIGNATURES_VERSION = 1
MAX_SIGNATURE_BLOCK_SIZE = 1 << 20
ED25519_SIGNATURE_SIZE = 64

_KEYWORD = re.compile(r"[a-z][a-z0-9-]{0,31}", re.ASCII)
_ALGORITHM = re.compile(r"[a-z0-9][a-z0-9-]{0,63}", re.ASCII)
_FIELD = re.compile(r"[!-~]+", re.ASCII)
_KEY_ID = re.compile(r"[0-9a-f]{64}", re.ASCII)


class SignatureAlgorithm(StrEnum):
    ED25519 = "ed25519"


SUPPORTED_ALGORITHMS = frozenset(member.value for member in SignatureAlgorithm)


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
class SignatureBlock:
    """The parsed signature block. `extra_lines` are lines of kinds this version skips."""

    signatures: tuple[SignatureEntry, ...]
    extra_lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifiedSigner:
    """The trusted key whose signature over the manifest verified."""

    key_id: str
    algorithm: SignatureAlgorithm
    source: Path


def sign_manifest(manifest_bytes: bytes, private_key: PrivateKey) -> SignatureBlock:
    """A signature block holding one Ed25519 signature over `manifest_bytes`."""
    entry = SignatureEntry(
        algorithm=SignatureAlgorithm.ED25519.value,
        key_id=key_id(private_key.public_key()),
        signature=private_key.sign(manifest_bytes),
    )
    return SignatureBlock(signatures=(entry,))


def render_signature_block(block: SignatureBlock) -> bytes:
    lines = [f"avobuild-signatures {SIGNATURES_VERSION}"]
    lines.extend(
        f"signature {entry.algorithm} {entry.key_id} {base64.b64encode(entry.signature).decode()}"
        for entry in block.signatures
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
    extra: list[str] = []
    for number, line in enumerate(text[:-1].split("\n"), start=1):
        try:
            fields = _split(line)
            if number == 1:
                _check_first_line(fields)
            elif fields[0] == "signature":
                entry = _parse_signature(fields)
                if any(other.key_id == entry.key_id for other in signatures):
                    raise SignatureError(f"a second signature by key {entry.key_id}")
                signatures.append(entry)
            else:
                extra.append(line)
        except SignatureError as error:
            raise SignatureError(f"signature block line {number}: {error}") from None
    return SignatureBlock(signatures=tuple(signatures), extra_lines=tuple(extra))


def _split(line: str) -> list[str]:
    if not line:
        raise SignatureError("empty line")
    fields = line.split(" ")
    if "" in fields:
        raise SignatureError("fields must be separated by exactly one space, with none at the ends")
    if not _KEYWORD.fullmatch(fields[0]):
        raise SignatureError(f"expected a keyword matching [a-z][a-z0-9-]*, got {fields[0]!r}")
    for field in fields[1:]:
        if not _FIELD.fullmatch(field):
            raise SignatureError(f"field {field!r} holds a control character")
    return fields


def _check_first_line(fields: list[str]) -> None:
    if fields[0] != "avobuild-signatures" or len(fields) != 2:
        raise SignatureError(
            f"expected 'avobuild-signatures {SIGNATURES_VERSION}', got {' '.join(fields)!r}"
        )
    if fields[1] != str(SIGNATURES_VERSION):
        raise SignatureError(
            f"unsupported signature block version {fields[1]!r} "
            f"(this avobuild reads version {SIGNATURES_VERSION})"
        )


def _parse_signature(fields: list[str]) -> SignatureEntry:
    if len(fields) != 4:
        raise SignatureError(
            f"signature: expected 3 values (algorithm, key-id, base64 signature), "
            f"got {len(fields) - 1}"
        )
    _, algorithm, identifier, encoded = fields
    if not _ALGORITHM.fullmatch(algorithm):
        raise SignatureError(f"signature: algorithm {algorithm!r} is not a valid name")
    if not _KEY_ID.fullmatch(identifier):
        raise SignatureError(
            f"signature: key-id: expected 64 lowercase hex digits, got {identifier!r}"
        )
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    # Only the canonical spelling is accepted, so that every byte of the block matters.
    if not raw or base64.b64encode(raw).decode("ascii") != encoded:
        raise SignatureError("signature: expected canonical base64 (RFC 4648, with padding)")
    if algorithm == SignatureAlgorithm.ED25519 and len(raw) != ED25519_SIGNATURE_SIZE:
        raise SignatureError(
            f"signature: an ed25519 signature is {ED25519_SIGNATURE_SIZE} bytes, got {len(raw)}"
        )
    return SignatureEntry(algorithm=algorithm, key_id=identifier, signature=raw)


def verify_signatures(
    manifest_bytes: bytes, block: SignatureBlock, keyring: Keyring
) -> VerifiedSigner:
    """Check the block against the keyring; return the first trusted signer that verifies."""
    if not block.signatures:
        raise SignatureError("the bundle is unsigned (its signature block holds no signature)")
    verified: VerifiedSigner | None = None
    untrusted: list[str] = []
    unsupported: list[str] = []
    for entry in block.signatures:
        if not entry.supported:
            unsupported.append(f"{entry.algorithm} (key {entry.key_id})")
            continue
        trusted = keyring.find(entry.key_id)
        if trusted is None:
            untrusted.append(entry.key_id)
            continue
        try:
            trusted.public_key.verify(entry.signature, manifest_bytes)
        except InvalidSignature:
            raise SignatureError(
                f"the signature by trusted key {entry.key_id} ({trusted.source}) does not match "
                "the manifest: the bundle was modified or the signature belongs to another "
                "manifest"
            ) from None
        if verified is None:
            verified = VerifiedSigner(
                entry.key_id, SignatureAlgorithm(entry.algorithm), trusted.source
            )
    if verified is not None:
        return verified
    if len(untrusted) == 1:
        raise SignatureError(
            f"bundle signed by key {untrusted[0]}, which is not in keyring {keyring.source}"
        )
    if untrusted:
        raise SignatureError(
            f"bundle signed by keys {', '.join(untrusted)}, none of which is in keyring "
            f"{keyring.source}"
        )
    raise SignatureError(
        "the bundle carries only signatures this avobuild cannot check: " + ", ".join(unsupported)
    )
