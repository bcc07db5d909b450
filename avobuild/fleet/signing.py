"""Signing and verifying the repository index with the bundles' signature machinery.

The index is signed exactly like a bundle manifest (docs/repository-format.md, section 4):
its body bytes are the signing input and the signature block is the bundle format's block,
byte for byte, so key files, PKCS#11 token keys, certificates, several signers and keyring
thresholds all work the same way, and the on-target applier's signature check verifies an
index unchanged.

This is the only module of `avobuild.fleet` that touches `avobuild.bundle`'s signing code,
so moving the index to another signing front end is a change to this file alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from avobuild.bundle.keys import (
    Keyring,
    PublicKey,
    load_keyring,
    public_key_pem,
)
from avobuild.bundle.sign import (
    MAX_SIGNATURE_BLOCK_SIZE,
    CertificateEntry,
    Signer,
    parse_signature_block,
    render_signature_block,
    sign_manifest_with,
)
from avobuild.bundle.signing import SigningPlan
from avobuild.bundle.verify import verify_all_signatures
from avobuild.errors import SignatureError
from avobuild.fleet.errors import IndexRefused, RepositoryError

__all__ = [
    "MAX_SIGNATURE_BLOCK_SIZE",
    "IndexSigners",
    "Keyring",
    "SigningPlan",
    "load_index_keyring",
    "open_index_signers",
    "sign_index_body",
    "verify_index_block",
]


@dataclass(frozen=True)
class IndexSigners:
    """Open signers (token sessions stay open while the context lives) and certificates."""

    signers: tuple[Signer, ...]
    public_keys: tuple[PublicKey, ...]
    certificates: tuple[CertificateEntry, ...]

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(signer.key_id for signer in self.signers)

    def public_keys_pem(self) -> bytes:
        """Every signer's public key, PEM, one after the other: a keyring file."""
        return b"".join(public_key_pem(key) for key in self.public_keys)


@contextmanager
def open_index_signers(plan: SigningPlan) -> Iterator[IndexSigners]:
    """The plan's signers, the bundles' own signing plan (key files, token keys, module, PIN,
    certificates); tokens are closed when the context ends."""
    if not plan.has_signers:
        raise RepositoryError(
            "no index signing key: give --key or --pkcs11, or set [signing] keys / pkcs11 in "
            "repository.toml"
        )
    certificates = plan.certificate_entries()
    with plan.signers() as signers:
        yield IndexSigners(signers, tuple(signer.public_key for signer in signers), certificates)


def sign_index_body(body: bytes, signers: IndexSigners) -> bytes:
    """The signature block over `body`: one signature per signer, then the certificates."""
    block = sign_manifest_with(body, signers.signers, signers.certificates)
    return render_signature_block(block)


def load_index_keyring(path: Path) -> Keyring:
    """A keyring for index signatures: the same files a bundle keyring may be."""
    return load_keyring(path)


# The bundle verifier words its messages for bundles and manifests; an index reader shows
# the same facts in its own terms.
_WORDS = {"bundle": "index", "manifest": "index body"}
_WORD = re.compile(r"\b(bundle|manifest)\b")


def verify_index_block(
    body: bytes, block_bytes: bytes, keyring: Keyring, *, now: int, name: str
) -> tuple[str, ...]:
    """Check the signature block over `body`; the key-ids of the trusted signers that verified.

    IndexRefused (naming `name`) unless the keyring's threshold of trusted signers is met;
    a trusted signature that does not verify refuses the index outright.
    """
    try:
        block = parse_signature_block(block_bytes)
        signers = verify_all_signatures(
            body, block, keyring, now=now, signing_time=lambda: _issued(body)
        )
    except SignatureError as error:
        message = _WORD.sub(lambda match: _WORDS[match.group(1)], str(error))
        raise IndexRefused(f"{name}: {message}") from None
    return tuple(signer.key_id for signer in signers)


def _issued(body: bytes) -> int:
    """The body's `issued` time, for keyrings that judge certificates at signing time.

    Only called after a signer over these exact bytes verified, so reading one line of them
    is safe; the strict parse follows anyway.
    """
    for line in body.split(b"\n", 8)[:8]:
        keyword, _, value = line.partition(b" ")
        if keyword == b"issued" and value.isdigit():
            return int(value)
    raise IndexRefused("index: no 'issued' line in the signed body")
