"""Verifying a signature block against a keyring: direct keys, certificate chains, thresholds.

docs/signing.md, "Verification". This sits above `sign` (the block's encoding and the
primitives) and `x509` (chains to trust anchors), so neither needs the other's verifier.
"""

from __future__ import annotations

from avobuild.bundle.keys import Keyring
from avobuild.bundle.sign import (
    SignatureAlgorithm,
    SignatureBlock,
    SigningTime,
    VerifiedSigner,
    verify_data,
)
from avobuild.bundle.x509 import ChainContext, certificate_signer
from avobuild.errors import SignatureError


def verify_signatures(
    manifest_bytes: bytes,
    block: SignatureBlock,
    keyring: Keyring,
    *,
    now: int | None = None,
    signing_time: SigningTime | None = None,
) -> VerifiedSigner:
    """Check the block against the keyring; return the first trusted signer that verified."""
    return verify_all_signatures(
        manifest_bytes, block, keyring, now=now, signing_time=signing_time
    )[0]


def verify_all_signatures(
    manifest_bytes: bytes,
    block: SignatureBlock,
    keyring: Keyring,
    *,
    now: int | None = None,
    signing_time: SigningTime | None = None,
) -> tuple[VerifiedSigner, ...]:
    """Every trusted signer that verified; SignatureError unless the threshold is met."""
    if not block.signatures:
        raise SignatureError("the bundle is unsigned (its signature block holds no signature)")
    verified: list[VerifiedSigner] = []
    context = ChainContext(block, keyring) if keyring.anchors and block.certificates else None
    untrusted: list[str] = []
    unsupported: list[str] = []
    problems: list[str] = []
    for entry in block.signatures:
        if not entry.supported:
            unsupported.append(f"{entry.algorithm} (key {entry.key_id})")
            continue
        algorithm = SignatureAlgorithm(entry.algorithm)
        trusted = keyring.find(entry.key_id)
        if trusted is not None:
            if not verify_data(algorithm, trusted.public_key, entry.signature, manifest_bytes):
                raise SignatureError(
                    f"the signature by trusted key {entry.key_id} ({trusted.source}) does not "
                    "match the manifest: the bundle was modified or the signature belongs to "
                    "another manifest"
                )
            verified.append(VerifiedSigner(entry.key_id, algorithm, trusted.source))
            continue
        if context is not None:
            signer, problem = certificate_signer(
                entry, algorithm, context, manifest_bytes, now, signing_time
            )
            if signer is not None:
                verified.append(signer)
                continue
            if problem is not None:
                problems.append(problem)
                continue
        untrusted.append(entry.key_id)
    if len(verified) >= keyring.threshold:
        return tuple(verified)
    if keyring.threshold > 1 and verified:
        raise SignatureError(
            f"keyring {keyring.source} requires {keyring.threshold} trusted signatures, the "
            f"bundle has {len(verified)} (by {', '.join(s.key_id for s in verified)})"
            + "".join(f"; {problem}" for problem in problems)
        )
    if problems:
        raise SignatureError("; ".join(problems))
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
