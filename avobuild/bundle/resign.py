"""Signing an existing bundle: offline/HSM signing, attaching signatures, re-signing.

The signing input is the manifest bytes alone (docs/bundle-format.md 4), so all of this only
ever rewrites the header's S field and the signature block; the manifest and the payload are
copied byte for byte. The payload is streamed, never held in memory, and the output is
written to a temporary name and renamed, so it is never seen half-written (and may replace
the input).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from avobuild.bundle.header import HEADER_SIZE, parse_header, render_header
from avobuild.bundle.keys import Keyring, key_id, load_signer_identity
from avobuild.bundle.manifest import parse_manifest
from avobuild.bundle.sign import (
    CertificateEntry,
    SignatureBlock,
    SignatureEntry,
    Signer,
    make_signature,
    parse_signature_block,
    render_signature_block,
    signature_algorithm,
    to_der_signature,
    verify_data,
)
from avobuild.bundle.verify import verify_all_signatures
from avobuild.bundle.x509 import certificate_entry
from avobuild.errors import BundleError, KeyError_, SignatureError

_COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class SignedParts:
    """The regions of a bundle before the payload, and where the payload starts."""

    manifest_bytes: bytes
    block: SignatureBlock
    payload_offset: int


def read_signed_parts(bundle: Path) -> SignedParts:
    """Header, manifest and signature block of `bundle`; the manifest must parse."""
    try:
        with bundle.open("rb") as handle:
            header_bytes = handle.read(HEADER_SIZE)
            header = parse_header(header_bytes)
            manifest_bytes = handle.read(header.manifest_size)
            block_bytes = handle.read(header.signature_block_size)
    except OSError as error:
        raise BundleError(f"{bundle}: cannot read: {error.strerror or error}") from None
    except BundleError as error:
        raise BundleError(f"{bundle}: {error}") from None
    if len(block_bytes) != header.signature_block_size:
        raise BundleError(f"{bundle}: truncated before the end of the signature block")
    try:
        # Refuse to sign anything that is not a valid manifest.
        parse_manifest(manifest_bytes)
        block = parse_signature_block(block_bytes)
    except BundleError as error:
        raise BundleError(f"{bundle}: {error}") from None
    return SignedParts(manifest_bytes, block, header.payload_offset)


def signing_input(bundle: Path) -> bytes:
    """Exactly the bytes a signer signs: the manifest."""
    return read_signed_parts(bundle).manifest_bytes


def write_with_block(bundle: Path, output: Path, parts: SignedParts, block: SignatureBlock) -> None:
    """Write `bundle` to `output` with `block` as its signature block; payload copied as is."""
    block_bytes = render_signature_block(block)
    temporary = output.parent / f".{output.name}.{secrets.token_hex(6)}.tmp"
    try:
        with bundle.open("rb") as source, temporary.open("xb") as target:
            target.write(render_header(len(parts.manifest_bytes), len(block_bytes)))
            target.write(parts.manifest_bytes)
            target.write(block_bytes)
            source.seek(parts.payload_offset)
            shutil.copyfileobj(source, target, _COPY_BLOCK)
            target.flush()
            os.fsync(target.fileno())
        temporary.replace(output)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise BundleError(f"{output}: cannot write bundle: {error.strerror or error}") from None


def resign_bundle(
    bundle: Path,
    output: Path,
    signers: Sequence[Signer],
    *,
    replace: bool = False,
    remove: Sequence[str] = (),
    certificates: Sequence[CertificateEntry] = (),
    keyring: Keyring | None = None,
) -> SignatureBlock:
    """Add signatures by `signers` (or, with `replace`, make them the only ones).

    `remove` drops the signatures (and certificates) of these key-ids. With `keyring`, the
    existing signatures must verify first, so re-signing never launders a bundle.
    """
    parts = read_signed_parts(bundle)
    if keyring is not None:
        try:
            verify_all_signatures(parts.manifest_bytes, parts.block, keyring)
        except BundleError as error:
            raise SignatureError(f"{bundle}: {error}") from None
    block = parts.block
    if replace:
        block = SignatureBlock((), block.extra_lines)
    for identifier in remove:
        if not any(entry.key_id == identifier for entry in block.signatures):
            raise SignatureError(f"{bundle}: no signature by key {identifier} to remove")
        block = SignatureBlock(
            tuple(entry for entry in block.signatures if entry.key_id != identifier),
            block.extra_lines,
            tuple(entry for entry in block.certificates if entry.key_id != identifier),
        )
    for signer in signers:
        block = block.with_signature(make_signature(parts.manifest_bytes, signer))
    block = block.with_certificates(certificates)
    write_with_block(bundle, output, parts, block)
    return block


def attach_signature(
    bundle: Path, output: Path, signature: bytes, signer_file: Path
) -> SignatureEntry:
    """Add a signature made elsewhere over `bundle`'s manifest, by the key in `signer_file`.

    `signer_file` holds the public key, or the signer certificate (and intermediates, which
    are attached too). The signature must verify, so a wrong file is caught here and not on
    a device. ECDSA signatures may be DER or raw r||s.
    """
    parts = read_signed_parts(bundle)
    try:
        public_key, certificates = load_signer_identity(signer_file)
    except OSError as error:
        raise KeyError_(f"{signer_file}: cannot read: {error.strerror or error}") from None
    algorithm = signature_algorithm(public_key)
    signature = to_der_signature(algorithm, signature)
    if not verify_data(algorithm, public_key, signature, parts.manifest_bytes):
        raise SignatureError(
            f"the signature does not verify with {signer_file} ({algorithm.value}) over the "
            f"manifest of {bundle}; sign exactly the bytes 'avobuild bundle digest' writes"
        )
    entry = SignatureEntry(algorithm.value, key_id(public_key), signature)
    block = parts.block.with_signature(entry)
    block = block.with_certificates([certificate_entry(cert) for cert in certificates])
    write_with_block(bundle, output, parts, block)
    return entry
