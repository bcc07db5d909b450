"""Signer certificates: trust through a chain to a keyring's trust anchors (docs/signing.md).

A signature block may carry `certificate <key-id> <base64-DER>` lines: the signer's
certificate and its intermediates. A signature whose key is not in the keyring is trusted when
a certificate for its key chains to a keyring anchor with:

* each link issued by the next (issuer name and signature), at most MAX_DEPTH links;
* every issuer a CA (basicConstraints CA:TRUE, keyCertSign if keyUsage is present, path
  length respected);
* every certificate valid at the verification time, or at the bundle's build-date when the
  keyring says `certificate-time = "signing"`;
* the signer certificate allowing digitalSignature (if keyUsage is present) and codeSigning
  (if extendedKeyUsage is present);
* no critical extension this module does not understand.

These are the checks `openssl verify -CAfile ANCHORS -untrusted CHAIN [-attime T]` makes on
the chain; the usage checks are those of RFC 5280 4.2.1.3 and 4.2.1.12.
"""

from __future__ import annotations

import time
import warnings
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from avobuild.bundle.keys import CertificateTime, Keyring, check_public_key, key_id
from avobuild.bundle.sign import (
    CertificateEntry,
    SignatureAlgorithm,
    SignatureBlock,
    SignatureEntry,
    SigningTime,
    VerifiedSigner,
    verify_data,
)
from avobuild.errors import KeyError_, SignatureError

MAX_DEPTH = 8
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
    try:
        return certificate.subject.rfc4514_string() or "(empty subject)"
    except ValueError:
        return "(unreadable subject)"


def build_chain(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], keyring: Keyring
) -> list[x509.Certificate] | str:
    """The chain leaf, intermediates…, anchor; or why there is none."""
    anchors = [anchor.certificate for anchor in keyring.anchors]
    if leaf in anchors:
        return [leaf]
    chain = [leaf]
    while len(chain) <= MAX_DEPTH:
        current = chain[-1]
        for anchor in anchors:
            if anchor.subject == current.issuer and _issued_by(current, anchor):
                return [*chain, anchor]
        parent = next(
            (
                candidate
                for candidate in intermediates
                if candidate not in chain
                and candidate.subject == current.issuer
                and _issued_by(current, candidate)
            ),
            None,
        )
        if parent is None:
            return (
                f"certificate {_name(leaf)} does not chain to a trust anchor of keyring "
                f"{keyring.source} (no issuer {current.issuer.rfc4514_string()!r} found)"
            )
        chain.append(parent)
    return f"certificate {_name(leaf)}: chain longer than {MAX_DEPTH} certificates"


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
    block: SignatureBlock,
    keyring: Keyring,
    manifest_bytes: bytes,
    now: int | None,
    signing_time: SigningTime | None,
) -> tuple[VerifiedSigner | None, str | None]:
    """The signer of `entry` if a certificate in `block` makes it trusted, else why not.

    (None, None) means the block has no certificate for the key: simply not trusted.
    """
    leaves = [cert for cert in block.certificates if cert.key_id == entry.key_id]
    if not leaves:
        return None, None
    loaded = [(_load(cert), cert) for cert in block.certificates]
    others = [cert for cert, raw in loaded if cert is not None and raw not in leaves]
    problem: str | None = None
    for raw in leaves:
        leaf = _load(raw)
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
            chain = build_chain(leaf, others, keyring)
        except ValueError as error:
            chain = f"certificate for key {entry.key_id}: malformed: {error}"
        if isinstance(chain, str):
            problem = chain
            continue
        problem = check_usage(chain)
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
