"""Signer certificates: trust through a chain to a keyring's trust anchors (docs/signing.md).

A signature block may carry `certificate <key-id> <base64-DER>` lines: the signer's
certificate and its intermediates. A signature whose key is not in the keyring is trusted when
a certificate for its key chains to a keyring anchor with:

* each link issued by the next (issuer name and signature), at most MAX_DEPTH certificates
  from the block (the anchor is not counted); block certificates sharing a subject are set
  aside, so each certificate has at most one possible issuer in the block;
* every certificate, anchor included, with a key a signer may have, and every one below the
  anchor signed with SHA-256/384/512 or Ed25519;
* every issuer a CA (basicConstraints CA:TRUE, keyCertSign if keyUsage is present, path
  length respected);
* every certificate valid at the verification time, or at the bundle's build-date when the
  keyring says `certificate-time = "signing"`;
* the signer certificate allowing digitalSignature (if keyUsage is present) and codeSigning
  (if extendedKeyUsage is present);
* no critical extension this module does not understand.

These are the checks `openssl verify -auth_level 2 -verify_depth 7 -CAfile ANCHORS -untrusted
CHAIN [-attime T]` makes on the chain, with a stricter key rule (RSA of 3072 bits or more,
where level 2 takes 2048); the usage checks are those of RFC 5280 4.2.1.3 and 4.2.1.12.
"""

from __future__ import annotations

import time
import warnings
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, SignatureAlgorithmOID

from avobuild.bundle.keys import (
    SUPPORTED_KEYS,
    CertificateTime,
    Keyring,
    check_public_key,
    describe_key,
    is_supported_key,
    key_id,
)
from avobuild.bundle.sign import (
    CertificateEntry,
    SignatureAlgorithm,
    SignatureBlock,
    SignatureEntry,
    SigningTime,
    VerifiedSigner,
    verify_data,
)
from avobuild.errors import KeyError_, SignatureError, shown

# Certificates from the block in one chain: the signer's and at most 7 intermediates (the
# trust anchor from the keyring is not counted).
MAX_DEPTH = 8
_SIGNATURE_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_UNDERSTOOD = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.CERTIFICATE_POLICIES,
}


def certificate_entry(certificate: x509.Certificate) -> CertificateEntry:
    """The signature-block line for `certificate`."""
    from cryptography.hazmat.primitives import serialization

    public_key = check_public_key(certificate.public_key(), "certificate")
    return CertificateEntry(
        key_id(public_key), certificate.public_bytes(serialization.Encoding.DER)
    )


def _load(entry: CertificateEntry) -> x509.Certificate | None:
    try:
        with warnings.catch_warnings():
            # Non-conforming certificates (e.g. a zero serial) are judged by the chain checks;
            # the library's deprecation notice would only reach the user as noise.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return x509.load_der_x509_certificate(entry.der)
    except (ValueError, x509.InvalidVersion):
        return None


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _name(certificate: x509.Certificate) -> str:
    """The subject for messages: untrusted text, so escaped and cut."""
    try:
        subject = certificate.subject.rfc4514_string()
    except ValueError:
        return "(unreadable subject)"
    return shown(subject, 120, quoted=False) if subject else "(empty subject)"


class ChainContext:
    """The certificates of one signature block judged against one keyring, loaded once.

    Certificates whose subject name occurs more than once in the block are set aside (not
    used as signer certificates nor as intermediates), so a certificate has at most one
    possible issuer in the block; with the issuer checks memoized, building the chains of
    every signer of a hostile block costs at most one signature check per certificate and
    possible issuer, and a possible issuer with a key avobuild does not allow is never used to
    check a signature at all.
    """

    def __init__(self, block: SignatureBlock, keyring: Keyring) -> None:
        self.keyring = keyring
        loaded = [(entry, _load(entry)) for entry in block.certificates]
        subjects: dict[bytes, int] = {}
        for _entry, certificate in loaded:
            if certificate is not None:
                subject = _subject_der(certificate)
                subjects[subject] = subjects.get(subject, 0) + 1
        self.loaded = loaded
        self.ambiguous = {
            entry.der
            for entry, certificate in loaded
            if certificate is not None and subjects[_subject_der(certificate)] > 1
        }
        self.anchors = [anchor.certificate for anchor in keyring.anchors]
        self._issued: dict[tuple[x509.Certificate, x509.Certificate], bool] = {}

    def issued_by(self, child: x509.Certificate, parent: x509.Certificate) -> bool:
        pair = (child, parent)
        if pair not in self._issued:
            self._issued[pair] = _issued_by(child, parent)
        return self._issued[pair]


def _subject_der(certificate: x509.Certificate) -> bytes:
    try:
        return certificate.subject.public_bytes()
    except ValueError:
        return b""


def build_chain(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], context: ChainContext
) -> list[x509.Certificate] | str:
    """The chain leaf, intermediates…, anchor; or why there is none. At most MAX_DEPTH
    certificates come from the block; the anchor, from the keyring, is not counted."""
    if leaf in context.anchors:
        return [leaf]
    chain = [leaf]
    while len(chain) <= MAX_DEPTH:
        current = chain[-1]
        weak = hash_problem(current)
        if weak is not None:
            return weak
        named = [
            candidate
            for candidate in (*context.anchors, *intermediates)
            if candidate not in chain and candidate.subject == current.issuer
        ]
        for candidate in named:
            problem = key_problem(candidate)
            if problem is not None:
                return problem
        for anchor in (candidate for candidate in named if candidate in context.anchors):
            if context.issued_by(current, anchor):
                return [*chain, anchor]
        parent = next(
            (
                candidate
                for candidate in named
                if candidate not in context.anchors and context.issued_by(current, candidate)
            ),
            None,
        )
        if parent is None:
            return (
                f"certificate {_name(leaf)} does not chain to a trust anchor of keyring "
                f"{context.keyring.source} (no issuer "
                f"{shown(current.issuer.rfc4514_string(), 120)} found)"
            )
        chain.append(parent)
    return f"certificate {_name(leaf)}: chain of more than {MAX_DEPTH} certificates"


def key_problem(certificate: x509.Certificate) -> str | None:
    """Why `certificate` may not be part of a chain because of its key, or None: every
    certificate of a chain, anchor included, needs a key a signer may have."""
    try:
        key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return f"certificate {_name(certificate)} has an unreadable public key"
    if not is_supported_key(key):
        return (
            f"certificate {_name(certificate)} has a {describe_key(key)} key, which a chain may "
            f"not hold (allowed: {SUPPORTED_KEYS})"
        )
    return None


def hash_problem(certificate: x509.Certificate) -> str | None:
    """Why the signature on `certificate` is too weak, or None: SHA-256, SHA-384 or SHA-512
    (or Ed25519, which hashes itself)."""
    try:
        algorithm = certificate.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
        if certificate.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
            return f"certificate {_name(certificate)} is signed with an unknown algorithm"
    if algorithm is not None and not isinstance(algorithm, _SIGNATURE_HASHES):
        return (
            f"certificate {_name(certificate)} is signed with {algorithm.name.upper()}; "
            "expected SHA-256, SHA-384 or SHA-512"
        )
    return None


def check_chain_strength(chain: list[x509.Certificate]) -> str | None:
    """Why the chain's keys or signatures are too weak, or None (the anchor's own
    signature does not matter: the keyring trusts it)."""
    for certificate in chain:
        problem = key_problem(certificate)
        if problem is not None:
            return problem
    for certificate in chain[:-1]:
        problem = hash_problem(certificate)
        if problem is not None:
            return problem
    return None


def _extension(certificate: x509.Certificate, extension_type: type[x509.ExtensionType]) -> object:
    try:
        return certificate.extensions.get_extension_for_class(extension_type).value
    except x509.ExtensionNotFound:
        return None


def check_usage(chain: list[x509.Certificate]) -> str | None:
    """Why the chain may not sign bundles, or None."""
    try:
        return _check_usage(chain)
    except ValueError as error:
        # Extensions are decoded lazily; a malformed one only shows up here.
        return f"a certificate of the chain has a malformed extension: {error}"


def _check_usage(chain: list[x509.Certificate]) -> str | None:
    for certificate in chain:
        for extension in certificate.extensions:
            if extension.critical and extension.oid not in _UNDERSTOOD:
                return (
                    f"certificate {_name(certificate)} has an unknown critical extension "
                    f"{extension.oid.dotted_string}"
                )
    leaf = chain[0]
    usage = _extension(leaf, x509.KeyUsage)
    if isinstance(usage, x509.KeyUsage) and not usage.digital_signature:
        return f"certificate {_name(leaf)}: keyUsage does not allow digitalSignature"
    extended = _extension(leaf, x509.ExtendedKeyUsage)
    if isinstance(extended, x509.ExtendedKeyUsage) and (
        ExtendedKeyUsageOID.CODE_SIGNING not in extended
    ):
        return f"certificate {_name(leaf)}: extendedKeyUsage does not include codeSigning"
    for depth, issuer in enumerate(chain[1:]):
        if issuer is leaf:
            continue
        constraints = _extension(issuer, x509.BasicConstraints)
        is_anchor = issuer is chain[-1]
        if not isinstance(constraints, x509.BasicConstraints):
            if is_anchor:
                continue
            return f"certificate {_name(issuer)} issues certificates but is not a CA"
        if not constraints.ca:
            return f"certificate {_name(issuer)} issues certificates but is not a CA"
        if constraints.path_length is not None and depth > constraints.path_length:
            return f"certificate {_name(issuer)}: path length constraint exceeded"
        issuer_usage = _extension(issuer, x509.KeyUsage)
        if isinstance(issuer_usage, x509.KeyUsage) and not issuer_usage.key_cert_sign:
            return f"certificate {_name(issuer)}: keyUsage does not allow keyCertSign"
    return None


def check_validity(chain: list[x509.Certificate], at: int, what: str) -> str | None:
    moment = datetime.fromtimestamp(at, UTC)
    for certificate in chain:
        if moment < certificate.not_valid_before_utc:
            return (
                f"certificate {_name(certificate)} is not valid yet at {what} "
                f"{moment.isoformat()} (valid from {certificate.not_valid_before_utc.isoformat()})"
            )
        if moment > certificate.not_valid_after_utc:
            return (
                f"certificate {_name(certificate)} expired before {what} {moment.isoformat()} "
                f"(valid until {certificate.not_valid_after_utc.isoformat()})"
            )
    return None


def certificate_signer(
    entry: SignatureEntry,
    algorithm: SignatureAlgorithm,
    context: ChainContext,
    manifest_bytes: bytes,
    now: int | None,
    signing_time: SigningTime | None,
) -> tuple[VerifiedSigner | None, str | None]:
    """The signer of `entry` if a certificate of the block makes it trusted, else why not.

    (None, None) means the block has no certificate for the key: simply not trusted.
    """
    keyring = context.keyring
    leaves = [(raw, cert) for raw, cert in context.loaded if raw.key_id == entry.key_id]
    if not leaves:
        return None, None
    others = [
        cert
        for raw, cert in context.loaded
        if cert is not None and raw.key_id != entry.key_id and raw.der not in context.ambiguous
    ]
    problem: str | None = None
    for raw, leaf in leaves:
        if leaf is not None and raw.der in context.ambiguous:
            problem = (
                f"certificate {_name(leaf)} shares its subject with another certificate of the "
                "block; such certificates are not used"
            )
            continue
        if leaf is None:
            problem = f"the certificate for key {entry.key_id} is not a readable X.509 certificate"
            continue
        try:
            public_key = check_public_key(leaf.public_key(), f"certificate {_name(leaf)}")
        except KeyError_ as error:
            problem = str(error)
            continue
        except (ValueError, UnsupportedAlgorithm):
            problem = f"the certificate for key {entry.key_id} has an unreadable public key"
            continue
        if key_id(public_key) != entry.key_id:
            problem = f"certificate {_name(leaf)} is not for key {entry.key_id}"
            continue
        try:
            chain = build_chain(leaf, others, context)
        except ValueError as error:
            chain = f"certificate for key {entry.key_id}: malformed: {shown(str(error), 200)}"
        if isinstance(chain, str):
            problem = chain
            continue
        problem = check_chain_strength(chain) or check_usage(chain)
        if problem is not None:
            continue
        if not verify_data(algorithm, public_key, entry.signature, manifest_bytes):
            raise SignatureError(
                f"the signature by key {entry.key_id} (certificate {_name(leaf)}, trusted "
                f"through keyring {keyring.source}) does not match the manifest: the bundle "
                "was modified or the signature belongs to another manifest"
            )
        if keyring.certificate_time is CertificateTime.SIGNING and signing_time is not None:
            at, what = signing_time(), "the bundle's build-date"
        else:
            at, what = (now if now is not None else int(time.time())), "verification time"
        problem = check_validity(chain, at, what)
        if problem is None:
            return VerifiedSigner(entry.key_id, algorithm, keyring.source, _name(leaf)), None
    return None, problem
