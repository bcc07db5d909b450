"""Signer certificates: chains to trust anchors, validity, key usage (docs/signing.md).

Certificates are made here with `cryptography`; `openssl verify` is the oracle that the
chains avobuild accepts are chains openssl accepts, and that those it refuses for time or
chain reasons openssl refuses too.
"""

from __future__ import annotations

import datetime
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import avobuild_cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from avobuild.bundle.keys import load_keyring
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.resign import read_signed_parts, write_with_block
from avobuild.bundle.sign import CertificateEntry, SignatureBlock
from avobuild.bundle.writer import ImageSource, write_bundle
from avobuild.bundle.x509 import certificate_entry
from avobuild.errors import SignatureError

BUILD_DATE = 1767225600  # 2026-01-01
NOW = 1785000000  # mid 2026
DAY = datetime.timedelta(days=1)


def at(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def make_certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    not_before: int = BUILD_DATE - 365 * 86400,
    not_after: int = BUILD_DATE + 3 * 365 * 86400,
    usage: str = "sign",
    extended: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name = issuer[0].subject if issuer else subject
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(random.Random(name).getrandbits(64))
        .not_valid_before(at(not_before))
        .not_valid_after(at(not_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=usage == "sign",
                content_commitment=False,
                key_encipherment=usage == "encipher",
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if extended is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(extended), critical=False)
    algorithm = None if isinstance(signing_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signing_key, algorithm)  # type: ignore[arg-type]


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


@dataclass(frozen=True)
class Pki:
    root: x509.Certificate
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    files: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    files = tmp_path_factory.mktemp("pki")
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = make_certificate("Acme Root", root_key, None, ca=True,
                            not_after=BUILD_DATE + 20 * 365 * 86400)  # fmt: skip
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = make_certificate("Acme Release CA", intermediate_key, (root, root_key),
                                    ca=True)  # fmt: skip
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = make_certificate("release-2026", leaf_key, (intermediate, intermediate_key), ca=False,
                            extended=[ExtendedKeyUsageOID.CODE_SIGNING])  # fmt: skip
    (files / "root.pem").write_bytes(pem(root))
    (files / "chain.pem").write_bytes(pem(leaf, intermediate))
    (files / "intermediate.pem").write_bytes(pem(intermediate))
    (files / "leaf.pem").write_bytes(pem(leaf))
    (files / "leaf.key.pem").write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    return Pki(root, intermediate, intermediate_key, leaf, leaf_key, files)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageSource:
    path = tmp_path_factory.mktemp("image") / "rootfs.img"
    path.write_bytes(random.Random(5).randbytes(100_000))
    return ImageSource("rootfs", path)


def signed(
    output: Path, image: ImageSource, key: ec.EllipticCurvePrivateKey,
    chain: list[x509.Certificate],
) -> Path:  # fmt: skip
    write_bundle(output, [image], name="demo", version="1.0", compatible="acme",
                 build_date=BUILD_DATE, private_key=key, chunk_size=64 << 10,
                 certificates=[certificate_entry(c) for c in chain])  # fmt: skip
    return output


def verify(bundle: Path, keyring: Path, now: int = NOW) -> BundleReader:
    with BundleReader.open(bundle) as reader:
        reader.verify_signature(load_keyring(keyring), now=now)
        reader.verify_payload()
        return reader


def openssl_verify(pki: Pki, leaf: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki.files / "root.pem"), "-untrusted",
         str(pki.files / "intermediate.pem"), *extra, str(leaf)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_a_chain_to_a_trust_anchor_is_trusted(tmp_path: Path, pki: Pki, image: ImageSource) -> None:
    bundle = signed(tmp_path / "b.avb", image, pki.leaf_key, [pki.leaf, pki.intermediate])
    reader = verify(bundle, pki.files / "root.pem")
    assert reader.signer is not None
    assert reader.signer.certificate_subject == "CN=release-2026"
    result = openssl_verify(pki, pki.files / "leaf.pem", "-attime", str(NOW))
    assert result.returncode == 0 and ": OK" in result.stdout
    # A directory keyring with the anchor works the same; the leaf key alone is not trusted.
    ring = tmp_path / "ring"
    ring.mkdir()
    (ring / "root.pem").write_bytes(pem(pki.root))
    verify(bundle, ring)
    # A raw key still works beside certificates, and so does the threshold over both kinds.
    (tmp_path / "leaf.pub.pem").write_bytes(pki.leaf_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    assert verify(bundle, tmp_path / "leaf.pub.pem").signer.certificate_subject is None  # type: ignore[union-attr]


def test_untrusted_or_broken_chains_are_refused(
    tmp_path: Path, pki: Pki, image: ImageSource
) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_root = make_certificate("Other Root", other_key, None, ca=True)
    (tmp_path / "other.pem").write_bytes(pem(other_root))
    bundle = signed(tmp_path / "b.avb", image, pki.leaf_key, [pki.leaf, pki.intermediate])
    with pytest.raises(SignatureError, match="does not chain to a trust anchor"):
        verify(bundle, tmp_path / "other.pem")
    # Without the intermediate there is no chain either (and openssl agrees).
    missing = signed(tmp_path / "m.avb", image, pki.leaf_key, [pki.leaf])
    with pytest.raises(SignatureError, match="no issuer 'CN=Acme Release CA' found"):
        verify(missing, pki.files / "root.pem")
    result = subprocess.run(["openssl", "verify", "-CAfile", str(pki.files / "root.pem"),
                             str(pki.files / "leaf.pem")], capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert result.returncode != 0
    # An intermediate that is not a CA cannot issue.
    fake_key = ec.generate_private_key(ec.SECP256R1())
    not_ca_leaf = make_certificate("by-a-leaf", fake_key, (pki.leaf, pki.leaf_key), ca=False)
    bundle = signed(tmp_path / "n.avb", image, fake_key, [not_ca_leaf, pki.leaf, pki.intermediate])
    with pytest.raises(SignatureError, match="CN=release-2026 issues certificates but is not a CA"):
        verify(bundle, pki.files / "root.pem")


def test_key_usage_is_enforced(tmp_path: Path, pki: Pki, image: ImageSource) -> None:
    issuer = (pki.intermediate, pki.intermediate_key)
    key = ec.generate_private_key(ec.SECP256R1())
    for name, options, message in (
        ("tls", {"extended": [ExtendedKeyUsageOID.SERVER_AUTH]}, "does not include codeSigning"),
        ("encipher", {"usage": "encipher"}, "does not allow digitalSignature"),
    ):
        certificate = make_certificate(name, key, issuer, ca=False, **options)  # type: ignore[arg-type]
        bundle = signed(tmp_path / f"{name}.avb", image, key, [certificate, pki.intermediate])
        with pytest.raises(SignatureError, match=message):
            verify(bundle, pki.files / "root.pem")
    # No extendedKeyUsage at all is fine: only a present one must name codeSigning.
    plain = make_certificate("plain", key, issuer, ca=False)
    verify(signed(tmp_path / "plain.avb", image, key, [plain, pki.intermediate]),
           pki.files / "root.pem")  # fmt: skip


def test_validity_now_or_at_signing_time(tmp_path: Path, pki: Pki, image: ImageSource) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    expired = make_certificate("short-lived", key, (pki.intermediate, pki.intermediate_key),
                               ca=False, not_before=BUILD_DATE - 86400,
                               not_after=BUILD_DATE + 86400)  # fmt: skip
    (tmp_path / "expired.pem").write_bytes(pem(expired))
    bundle = signed(tmp_path / "b.avb", image, key, [expired, pki.intermediate])
    with pytest.raises(SignatureError, match="CN=short-lived expired before verification time"):
        verify(bundle, pki.files / "root.pem")
    assert openssl_verify(pki, tmp_path / "expired.pem", "-attime", str(NOW)).returncode != 0
    # Judged at the bundle's build-date, the certificate was valid (openssl -attime agrees).
    (tmp_path / "signing-time.toml").write_text(
        f'keys = ["{pki.files / "root.pem"}"]\ncertificate-time = "signing"\n'
    )
    verify(bundle, tmp_path / "signing-time.toml")
    assert openssl_verify(pki, tmp_path / "expired.pem", "-attime", str(BUILD_DATE)).returncode == 0
    not_yet = make_certificate("future", key, (pki.intermediate, pki.intermediate_key),
                               ca=False, not_before=NOW + 86400)  # fmt: skip
    bundle = signed(tmp_path / "f.avb", image, key, [not_yet, pki.intermediate])
    with pytest.raises(SignatureError, match="CN=future is not valid yet"):
        verify(bundle, pki.files / "root.pem")


def test_a_bad_signature_under_a_valid_chain_is_tampering(
    tmp_path: Path, pki: Pki, image: ImageSource
) -> None:
    bundle = signed(tmp_path / "b.avb", image, pki.leaf_key, [pki.leaf, pki.intermediate])
    other = tmp_path / "other.avb"
    write_bundle(other, [image], name="demo", version="6.6", compatible="acme",
                 build_date=BUILD_DATE, private_key=ec.generate_private_key(ec.SECP256R1()),
                 chunk_size=64 << 10)  # fmt: skip
    # Move the chain-backed signature block onto another manifest.
    moved = read_signed_parts(bundle).block
    write_with_block(other, tmp_path / "moved.avb", read_signed_parts(other), moved)
    with pytest.raises(SignatureError, match=r"certificate CN=release-2026, trusted through"):
        verify(tmp_path / "moved.avb", pki.files / "root.pem")


def test_certificates_through_the_command_line(
    tmp_path: Path, pki: Pki, image: ImageSource
) -> None:
    bundle = tmp_path / "cli.avb"
    avobuild_cli("bundle", "create", "--image", f"rootfs={image.path}", "--name", "demo",
                 "--version", "1.0", "--compatible", "acme", "--key", pki.files / "leaf.key.pem",
                 "--certificate", pki.files / "chain.pem", "-o", bundle)  # fmt: skip
    result = avobuild_cli("bundle", "verify", bundle, "--keyring", pki.files / "root.pem")
    assert "OK: demo 1.0" in result.stdout
    info = avobuild_cli("bundle", "info", bundle).stdout
    assert info.count("certificate for key") == 2
    # Offline: sign the digest with openssl, attach with the certificate chain.
    unsigned = tmp_path / "unsigned.avb"
    write_bundle(unsigned, [image], name="demo", version="1.1", compatible="acme",
                 build_date=BUILD_DATE, unsigned=True, chunk_size=64 << 10)  # fmt: skip
    avobuild_cli("bundle", "digest", unsigned, "-o", tmp_path / "tbs.bin")
    subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(pki.files / "leaf.key.pem"),
                    "-out", str(tmp_path / "sig.der"), str(tmp_path / "tbs.bin")],
                   check=True)  # fmt: skip
    avobuild_cli("bundle", "attach-signature", unsigned, "--signature", tmp_path / "sig.der",
                 "--key", pki.files / "chain.pem", "-o", tmp_path / "signed.avb")  # fmt: skip
    verify(tmp_path / "signed.avb", pki.files / "root.pem")
    block = read_signed_parts(tmp_path / "signed.avb").block
    assert [c.der for c in block.certificates] == [
        certificate_entry(pki.leaf).der,
        certificate_entry(pki.intermediate).der,
    ]


def test_unreadable_certificates_only_fail_their_signer(
    tmp_path: Path, pki: Pki, image: ImageSource
) -> None:
    """Certificate lines add evidence: a garbled one makes that signer untrusted, and a raw
    trusted key's signature still counts."""
    bundle = signed(tmp_path / "b.avb", image, pki.leaf_key, [pki.leaf, pki.intermediate])
    parts = read_signed_parts(bundle)
    entry = certificate_entry(pki.leaf)
    garbled = type(entry)(entry.key_id, entry.der[:-1] + bytes([entry.der[-1] ^ 1]))
    block = SignatureBlock(parts.block.signatures, (), (garbled, parts.block.certificates[1]))
    write_with_block(bundle, tmp_path / "g.avb", parts, block)
    with pytest.raises(SignatureError, match=r"not a readable X\.509|does not chain"):
        verify(tmp_path / "g.avb", pki.files / "root.pem")
    (tmp_path / "both.pem").write_bytes(
        pem(pki.root)
        + pki.leaf_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    verify(tmp_path / "g.avb", tmp_path / "both.pem")


def _rsa_certificate(
    name: str, key: object, issuer: tuple[x509.Certificate, object], *, ca: bool,
    digest: hashes.HashAlgorithm | None = None,
) -> x509.Certificate:  # fmt: skip
    """Like make_certificate, for an RSA subject key or an RSA issuer key, with a chosen hash."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(random.Random(name).getrandbits(64))
        .not_valid_before(at(BUILD_DATE - 86400))
        .not_valid_after(at(BUILD_DATE + 3 * 365 * 86400))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(issuer[1], digest or hashes.SHA256())  # type: ignore[arg-type]


def test_every_certificate_of_a_chain_needs_a_strong_key_and_hash(
    tmp_path: Path, pki: Pki, image: ImageSource
) -> None:
    """An RSA-1024 intermediate and a SHA-1 signature break a chain, in avobuild and in openssl
    (at security level 2); the signer keys' rules hold for every certificate."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_ca = _rsa_certificate("Weak CA", weak_key, (pki.intermediate, pki.intermediate_key),
                               ca=True)  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _rsa_certificate("through-weak", key, (weak_ca, weak_key), ca=False)
    bundle = tmp_path / "weak.avb"
    write_bundle(bundle, [image], name="demo", version="1.0", compatible="acme",
                 build_date=BUILD_DATE, private_key=key, chunk_size=64 << 10,
                 certificates=[_entry(c) for c in (leaf, weak_ca, pki.intermediate)])  # fmt: skip
    with pytest.raises(SignatureError, match=r"CN=Weak CA has a RSA-1024 key, which a chain"):
        verify(bundle, pki.files / "root.pem")
    (tmp_path / "untrusted.pem").write_bytes(pem(weak_ca, pki.intermediate))
    (tmp_path / "leaf.pem").write_bytes(pem(leaf))
    refused = subprocess.run(
        ["openssl", "verify", "-auth_level", "2", "-CAfile", str(pki.files / "root.pem"),
         "-untrusted", str(tmp_path / "untrusted.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "too weak" in refused.stdout + refused.stderr
    # cryptography refuses to make a SHA-1 signature; openssl still can (valid from today)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    (tmp_path / "ca.key.pem").write_bytes(pki.intermediate_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    for command in (
        ["req", "-new", "-key", "key.pem", "-subj", "/CN=sha1-signed", "-out", "leaf.csr"],
        ["x509", "-req", "-in", "leaf.csr", "-CA", str(pki.files / "intermediate.pem"),
         "-CAkey", "ca.key.pem", "-sha1", "-days", "30", "-set_serial", "77", "-out", "sha1.pem"],
    ):  # fmt: skip
        subprocess.run(["openssl", *command], cwd=tmp_path, check=True, capture_output=True)
    sha1 = x509.load_pem_x509_certificate((tmp_path / "sha1.pem").read_bytes())
    bundle = signed(tmp_path / "sha1.avb", image, key, [sha1, pki.intermediate])
    with pytest.raises(
        SignatureError, match="CN=sha1-signed is signed with SHA1; expected SHA-256"
    ):
        verify(bundle, pki.files / "root.pem", now=int(time.time()))
    assert openssl_verify(pki, tmp_path / "sha1.pem", "-auth_level", "2").returncode != 0
    # the same chain with a strong intermediate verifies
    good = _rsa_certificate("through-good", key, (pki.intermediate, pki.intermediate_key),
                            ca=False)  # fmt: skip
    verify(signed(tmp_path / "good.avb", image, key, [good, pki.intermediate]),
           pki.files / "root.pem")  # fmt: skip


def test_a_certificate_is_carried_once_and_subjects_are_unique(
    tmp_path: Path, pki: Pki, image: ImageSource
) -> None:
    """The same DER under a second key-id is refused by the parser; two certificates with one
    subject are set aside, so no chain goes through them (bounded work for a hostile block)."""
    from avobuild.bundle.sign import parse_signature_block

    bundle = signed(tmp_path / "b.avb", image, pki.leaf_key, [pki.leaf, pki.intermediate])
    parts = read_signed_parts(bundle)
    leaf, intermediate = parts.block.certificates
    twice = SignatureBlock(parts.block.signatures, (), (leaf, CertificateEntry("b" * 64, leaf.der)))
    with pytest.raises(SignatureError, match=r"the same certificate twice \(identical DER"):
        parse_signature_block(_raw_block(twice))
    other_key = ec.generate_private_key(ec.SECP256R1())
    namesake = make_certificate("Acme Release CA", other_key, (pki.root, pki.intermediate_key),
                                ca=True)  # fmt: skip
    crowded = SignatureBlock(parts.block.signatures, (),
                             (leaf, intermediate, certificate_entry(namesake)))  # fmt: skip
    write_with_block(bundle, tmp_path / "crowded.avb", parts, crowded)
    with pytest.raises(SignatureError, match="no issuer 'CN=Acme Release CA' found"):
        verify(tmp_path / "crowded.avb", pki.files / "root.pem")


def _entry(certificate: x509.Certificate) -> CertificateEntry:
    """A certificate line for any certificate (the writer's `certificate_entry` refuses weak
    keys, as it should)."""
    import hashlib

    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return CertificateEntry(
        hashlib.sha256(spki).hexdigest(), certificate.public_bytes(serialization.Encoding.DER)
    )


def _raw_block(block: SignatureBlock) -> bytes:
    """The block's text, written by hand (the renderer refuses what the parser refuses)."""
    import base64

    lines = ["avobuild-signatures 1"]
    lines += [f"signature {s.algorithm} {s.key_id} {base64.b64encode(s.signature).decode()}"
              for s in block.signatures]  # fmt: skip
    lines += [f"certificate {c.key_id} {base64.b64encode(c.der).decode()}"
              for c in block.certificates]  # fmt: skip
    return "".join(line + "\n" for line in lines).encode()
