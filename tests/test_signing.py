"""Signature algorithms, thresholds, re-signing, offline signing and PKCS#11 (docs/signing.md).

Oracles: `openssl` verifies every algorithm's signature over the manifest bytes and makes the
offline signatures; SoftHSM2 holds real PKCS#11 keys; the payload bytes of re-signed bundles
are compared with the original's.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import avobuild_cli, write_product
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from avobuild.bundle.header import HEADER_SIZE, render_header
from avobuild.bundle.keys import (
    KeyAlgorithm,
    PrivateKey,
    generate_keypair,
    key_id,
    load_keyring,
    load_private_key,
)
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.resign import read_signed_parts, resign_bundle
from avobuild.bundle.sign import (
    KeySigner,
    SignatureAlgorithm,
    SignatureBlock,
    SignatureEntry,
    parse_signature_block,
    render_signature_block,
    sign_data,
)
from avobuild.bundle.writer import ImageSource, write_bundle
from avobuild.errors import BundleError, KeyError_, SignatureError

SEED = 3003
CHUNK = 64 << 10
ALGORITHMS = {
    KeyAlgorithm.ED25519: SignatureAlgorithm.ED25519,
    KeyAlgorithm.ECDSA_P256: SignatureAlgorithm.ECDSA_P256_SHA256,
    KeyAlgorithm.ECDSA_P384: SignatureAlgorithm.ECDSA_P384_SHA384,
    KeyAlgorithm.RSA: SignatureAlgorithm.RSA_PSS_SHA256,
}


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    private_key: PrivateKey

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())


@pytest.fixture(scope="module")
def keypairs(tmp_path_factory: pytest.TempPathFactory) -> dict[KeyAlgorithm, KeyPair]:
    directory = tmp_path_factory.mktemp("keys")
    pairs = {}
    for algorithm in KeyAlgorithm:
        private_path, public_path = generate_keypair(directory, algorithm.value, algorithm)
        pairs[algorithm] = KeyPair(private_path, public_path, load_private_key(private_path))
    return pairs


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[ImageSource]:
    directory = tmp_path_factory.mktemp("images")
    rng = random.Random(SEED)
    sources = []
    for name, size in (("rootfs", 3 * CHUNK + 123), ("kernel", 5000)):
        path = directory / f"{name}.img"
        path.write_bytes(rng.randbytes(size // 2) + bytes(size - size // 2))
        sources.append(ImageSource(name, path))
    return sources


def make_bundle(output: Path, images: list[ImageSource], **options: object) -> Path:
    arguments: dict[str, object] = {
        "name": "demo",
        "version": "2.0.0",
        "compatible": "acme-x86_64-efi",
        "build_date": 1767225600,
        "chunk_size": CHUNK,
    }
    arguments.update(options)
    write_bundle(output, images, **arguments)  # type: ignore[arg-type]
    return output


def split(path: Path) -> tuple[bytes, bytes, bytes]:
    """Manifest, signature block and payload bytes of a bundle, parsed by hand."""
    data = path.read_bytes()
    match = re.fullmatch(rb"AVOBUNDLE 1 (\d{10}) (\d{10})\n", data[:HEADER_SIZE])
    assert match is not None
    manifest_size, block_size = int(match.group(1)), int(match.group(2))
    block_end = HEADER_SIZE + manifest_size + block_size
    return (
        data[HEADER_SIZE : HEADER_SIZE + manifest_size],
        data[HEADER_SIZE + manifest_size : block_end],
        data[block_end:],
    )


def verify(path: Path, keyring: Path) -> BundleReader:
    with BundleReader.open(path) as reader:
        reader.verify_signature(load_keyring(keyring))
        reader.verify_payload()
        return reader


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)


# The verification commands of docs/signing.md, one per algorithm.
def openssl_verify(
    algorithm: SignatureAlgorithm, public: Path, manifest: Path, signature: Path
) -> subprocess.CompletedProcess[str]:
    if algorithm is SignatureAlgorithm.ED25519:
        return openssl(
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            public,
            "-rawin",
            "-in",
            manifest,
            "-sigfile",
            signature,
        )
    if algorithm is SignatureAlgorithm.RSA_PSS_SHA256:
        return openssl(
            "dgst",
            "-sha256",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:32",
            "-sigopt",
            "rsa_mgf1_md:sha256",
            "-verify",
            public,
            "-signature",
            signature,
            manifest,
        )
    digest = "-sha384" if algorithm is SignatureAlgorithm.ECDSA_P384_SHA384 else "-sha256"
    return openssl("dgst", digest, "-verify", public, "-signature", signature, manifest)


def openssl_sign(
    algorithm: SignatureAlgorithm, private: Path, manifest: Path, signature: Path
) -> None:
    if algorithm is SignatureAlgorithm.ED25519:
        command = [
            "pkeyutl",
            "-sign",
            "-inkey",
            private,
            "-rawin",
            "-in",
            manifest,
            "-out",
            signature,
        ]
    elif algorithm is SignatureAlgorithm.RSA_PSS_SHA256:
        command = [
            "dgst",
            "-sha256",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:32",
            "-sigopt",
            "rsa_mgf1_md:sha256",
            "-sign",
            private,
            "-out",
            signature,
            manifest,
        ]
    else:
        digest = "-sha384" if algorithm is SignatureAlgorithm.ECDSA_P384_SHA384 else "-sha256"
        command = ["dgst", digest, "-sign", private, "-out", signature, manifest]
    result = openssl(*command)
    assert result.returncode == 0, result.stderr


# --- algorithms ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_every_algorithm_signs_and_openssl_verifies(
    tmp_path: Path,
    keypairs: dict[KeyAlgorithm, KeyPair],
    images: list[ImageSource],
    algorithm: KeyAlgorithm,
) -> None:
    pair = keypairs[algorithm]
    bundle = make_bundle(tmp_path / "b.avb", images, private_key=pair.private_key)
    reader = verify(bundle, pair.public_path)
    assert [(s.key_id, s.algorithm) for s in reader.signers] == [
        (pair.key_id, ALGORITHMS[algorithm])
    ]
    manifest, block, _ = split(bundle)
    (entry,) = parse_signature_block(block).signatures
    assert entry.algorithm == ALGORITHMS[algorithm].value
    (tmp_path / "manifest.bin").write_bytes(manifest)
    (tmp_path / "sig.bin").write_bytes(entry.signature)
    result = openssl_verify(
        ALGORITHMS[algorithm], pair.public_path, tmp_path / "manifest.bin", tmp_path / "sig.bin"
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"Verified OK|Signature Verified Successfully", result.stdout), result
    (tmp_path / "manifest.bin").write_bytes(manifest.replace(b"2.0.0", b"2.0.1"))
    result = openssl_verify(
        ALGORITHMS[algorithm], pair.public_path, tmp_path / "manifest.bin", tmp_path / "sig.bin"
    )
    assert result.returncode != 0
    # The key-id is what openssl computes from the public key.
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(pair.public_path), "-outform", "DER"],
        capture_output=True,
        check=True,
    ).stdout
    assert hashlib.sha256(der).hexdigest() == entry.key_id


def test_weak_and_unsupported_keys_are_refused(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p521 = ec.generate_private_key(ec.SECP521R1())
    for name, key in (("rsa2048", weak), ("p521", p521)):
        (tmp_path / f"{name}.key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (tmp_path / f"{name}.pub.pem").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    with pytest.raises(KeyError_, match=r"rsa2048\.key\.pem: RSA-2048 keys are not supported"):
        load_private_key(tmp_path / "rsa2048.key.pem")
    with pytest.raises(KeyError_, match=r"p521\.pub\.pem: ECDSA secp521r1 keys are not supported"):
        load_keyring(tmp_path / "p521.pub.pem")
    with pytest.raises(KeyError_, match="at least 3072 bits"):
        generate_keypair(tmp_path, "small", KeyAlgorithm.RSA, rsa_bits=2048)


def test_a_signature_line_that_lies_about_its_algorithm_is_refused(
    tmp_path: Path, keypairs: dict[KeyAlgorithm, KeyPair], images: list[ImageSource]
) -> None:
    """An ECDSA key's signature labelled with another algorithm fails like tampering."""
    pair = keypairs[KeyAlgorithm.ECDSA_P256]
    bundle = make_bundle(tmp_path / "b.avb", images, private_key=pair.private_key)
    parts = read_signed_parts(bundle)
    (entry,) = parts.block.signatures
    lying = SignatureEntry("ecdsa-p384-sha384", entry.key_id, entry.signature)
    from avobuild.bundle.resign import write_with_block

    write_with_block(bundle, tmp_path / "lying.avb", parts, SignatureBlock((lying,)))
    with pytest.raises(SignatureError, match=f"the signature by trusted key {pair.key_id}"):
        verify(tmp_path / "lying.avb", pair.public_path)


def test_keys_cli_generates_every_type(tmp_path: Path) -> None:
    for algorithm in ("ecdsa-p384", "rsa"):
        result = avobuild_cli(
            "keys", "generate", "-o", tmp_path, "--name", algorithm, "--type", algorithm
        )
        private = Path(result.stdout.split()[0])
        identity = avobuild_cli("keys", "id", private).stdout.split()
        expected = {"ecdsa-p384": "ecdsa-p384-sha384", "rsa": "rsa-pss-sha256"}[algorithm]
        assert identity == [key_id(load_private_key(private).public_key()), expected]
        assert (
            avobuild_cli("keys", "id", tmp_path / f"{algorithm}.pub.pem").stdout.split() == identity
        )
    bad = avobuild_cli("keys", "generate", "-o", tmp_path, "--type", "dsa", check=False)
    assert bad.returncode == KeyError_.exit_code and "expected one of ed25519" in bad.stderr


# --- several signatures, thresholds, re-signing, rotation ------------------------------------


def write_toml_keyring(path: Path, files: list[Path], threshold: int) -> Path:
    names = ", ".join(f'"{os.path.relpath(file, path.parent)}"' for file in files)
    path.write_text(f"# devices of the 2027 fleet\nthreshold = {threshold}\nkeys = [{names}]\n")
    return path


def test_threshold_keyring_counts_distinct_trusted_signers(
    tmp_path: Path, keypairs: dict[KeyAlgorithm, KeyPair], images: list[ImageSource]
) -> None:
    ed, p256, rsa_pair = (
        keypairs[a] for a in (KeyAlgorithm.ED25519, KeyAlgorithm.ECDSA_P256, KeyAlgorithm.RSA)
    )
    ring = write_toml_keyring(
        tmp_path / "two-of-three.toml", [ed.public_path, p256.public_path, rsa_pair.public_path], 2
    )
    keyring = load_keyring(ring)
    assert keyring.threshold == 2 and len(keyring.keys) == 3

    single = make_bundle(tmp_path / "single.avb", images, private_key=ed.private_key)
    with pytest.raises(SignatureError, match=r"requires 2 trusted signatures, the bundle has 1"):
        verify(single, ring)
    double = make_bundle(
        tmp_path / "double.avb",
        images,
        private_key=ed.private_key,
        signers=[KeySigner(rsa_pair.private_key)],
    )
    reader = verify(double, ring)
    assert {s.key_id for s in reader.signers} == {ed.key_id, rsa_pair.key_id}
    # The same key twice is one signer: the block refuses a second line by one key-id.
    _, block, _ = split(double)
    text = block.decode().splitlines()
    with pytest.raises(SignatureError, match="a second signature by key"):
        parse_signature_block(("\n".join([*text, text[1]]) + "\n").encode())

    with pytest.raises(KeyError_, match="threshold 4 can never be met by 3"):
        load_keyring(
            write_toml_keyring(
                tmp_path / "four.toml", [ed.public_path, p256.public_path, rsa_pair.public_path], 4
            )
        )
    (tmp_path / "typo.toml").write_text(f'treshold = 2\nkeys = ["{ed.public_path}"]\n')
    with pytest.raises(KeyError_, match=r"typo\.toml: treshold: unknown key"):
        load_keyring(tmp_path / "typo.toml")
    (tmp_path / "missing.toml").write_text('keys = ["nowhere.pem"]\n')
    with pytest.raises(KeyError_, match=r"nowhere\.pem: no such file"):
        load_keyring(tmp_path / "missing.toml")


def test_resign_keeps_manifest_and_payload_bytes(
    tmp_path: Path, keypairs: dict[KeyAlgorithm, KeyPair], images: list[ImageSource]
) -> None:
    ed, p384 = keypairs[KeyAlgorithm.ED25519], keypairs[KeyAlgorithm.ECDSA_P384]
    original = make_bundle(tmp_path / "orig.avb", images, private_key=ed.private_key)
    manifest, _, payload = split(original)
    avobuild_cli(
        "bundle",
        "resign",
        original,
        "-o",
        tmp_path / "added.avb",
        "--key",
        p384.private_path,
        "--keyring",
        ed.public_path,
    )
    added_manifest, added_block, added_payload = split(tmp_path / "added.avb")
    assert (added_manifest, added_payload) == (manifest, payload)
    assert [e.key_id for e in parse_signature_block(added_block).signatures] == [
        ed.key_id,
        p384.key_id,
    ]
    avobuild_cli(
        "bundle",
        "resign",
        original,
        "-o",
        tmp_path / "replaced.avb",
        "--replace",
        "--key",
        p384.private_path,
    )
    replaced = split(tmp_path / "replaced.avb")
    assert (replaced[0], replaced[2]) == (manifest, payload)
    assert [e.key_id for e in parse_signature_block(replaced[1]).signatures] == [p384.key_id]
    verify(tmp_path / "replaced.avb", p384.public_path)
    with pytest.raises(SignatureError, match="not in keyring"):
        verify(tmp_path / "replaced.avb", ed.public_path)
    # Re-signing under a keyring never launders a bundle whose signature is bad.
    bad = avobuild_cli(
        "bundle",
        "resign",
        tmp_path / "replaced.avb",
        "-o",
        tmp_path / "x.avb",
        "--key",
        ed.private_path,
        "--keyring",
        ed.public_path,
        check=False,
    )
    assert bad.returncode == SignatureError.exit_code and "not in keyring" in bad.stderr
    assert not (tmp_path / "x.avb").exists()


def test_key_rotation_with_a_dual_signed_bundle(
    tmp_path: Path, keypairs: dict[KeyAlgorithm, KeyPair], images: list[ImageSource]
) -> None:
    """Devices that trust only the old key and devices that trust only the new key both
    accept the transition bundle; after the old key is retired, old-only devices refuse."""
    old, new = keypairs[KeyAlgorithm.ED25519], keypairs[KeyAlgorithm.ECDSA_P256]
    bundle = make_bundle(tmp_path / "release.avb", images, private_key=old.private_key)
    resign_bundle(bundle, tmp_path / "transition.avb", [KeySigner(new.private_key)])
    for device_keyring in (old.public_path, new.public_path):
        reader = verify(tmp_path / "transition.avb", device_keyring)
        assert reader.manifest.version == "2.0.0"
    # A device trusting both, requiring both (a two-person rule during the transition).
    both = write_toml_keyring(tmp_path / "both.toml", [old.public_path, new.public_path], 2)
    assert len(verify(tmp_path / "transition.avb", both).signers) == 2
    avobuild_cli(
        "bundle",
        "resign",
        tmp_path / "transition.avb",
        "-o",
        tmp_path / "new-only.avb",
        "--remove",
        old.key_id,
    )
    verify(tmp_path / "new-only.avb", new.public_path)
    with pytest.raises(SignatureError, match=f"bundle signed by key {new.key_id}, which is not"):
        verify(tmp_path / "new-only.avb", old.public_path)


# --- offline signing -------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_offline_signing_with_openssl(
    tmp_path: Path,
    keypairs: dict[KeyAlgorithm, KeyPair],
    images: list[ImageSource],
    algorithm: KeyAlgorithm,
) -> None:
    pair = keypairs[algorithm]
    unsigned = tmp_path / "unsigned.avb"
    avobuild_cli(
        "bundle",
        "create",
        "-o",
        unsigned,
        "--unsigned",
        "--name",
        "demo",
        "--version",
        "3.0",
        "--compatible",
        "acme",
        "--chunk-size",
        "64K",
        *[f"--image={s.name}={s.path}" for s in images],
    )
    refused = avobuild_cli("bundle", "verify", unsigned, "--keyring", pair.public_path, check=False)
    assert refused.returncode == SignatureError.exit_code and "unsigned" in refused.stderr
    avobuild_cli("bundle", "digest", unsigned, "-o", tmp_path / "tbs.bin")
    assert (tmp_path / "tbs.bin").read_bytes() == split(unsigned)[0]
    openssl_sign(
        ALGORITHMS[algorithm], pair.private_path, tmp_path / "tbs.bin", tmp_path / "sig.bin"
    )
    avobuild_cli(
        "bundle",
        "attach-signature",
        unsigned,
        "--signature",
        tmp_path / "sig.bin",
        "--key",
        pair.public_path,
        "-o",
        tmp_path / "signed.avb",
    )
    result = avobuild_cli(
        "bundle", "verify", tmp_path / "signed.avb", "--keyring", pair.public_path
    )
    assert f"signed by {pair.key_id}" in result.stdout
    assert split(tmp_path / "signed.avb")[2] == split(unsigned)[2]

    # A signature over anything else is refused at attach time, not on a device.
    (tmp_path / "other.bin").write_bytes(b"not the manifest")
    openssl_sign(
        ALGORITHMS[algorithm], pair.private_path, tmp_path / "other.bin", tmp_path / "bad.bin"
    )
    bad = avobuild_cli(
        "bundle",
        "attach-signature",
        unsigned,
        "--signature",
        tmp_path / "bad.bin",
        "--key",
        pair.public_path,
        "-o",
        tmp_path / "bad.avb",
        check=False,
    )
    assert bad.returncode == SignatureError.exit_code
    assert "does not verify" in bad.stderr and not (tmp_path / "bad.avb").exists()


def test_raw_ecdsa_signatures_are_converted_to_der(
    tmp_path: Path, keypairs: dict[KeyAlgorithm, KeyPair], images: list[ImageSource]
) -> None:
    """HSMs and JOSE tools return r||s; attach-signature stores the DER form openssl reads."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    from avobuild.bundle.resign import attach_signature

    pair = keypairs[KeyAlgorithm.ECDSA_P384]
    unsigned = make_bundle(tmp_path / "u.avb", images, unsigned=True)
    r, s = decode_dss_signature(sign_data(pair.private_key, split(unsigned)[0]))
    entry = attach_signature(
        unsigned,
        tmp_path / "s.avb",
        r.to_bytes(48, "big") + s.to_bytes(48, "big"),
        pair.public_path,
    )
    assert decode_dss_signature(entry.signature) == (r, s)
    verify(tmp_path / "s.avb", pair.public_path)


@pytest.mark.parametrize(
    "algorithm", [SignatureAlgorithm.ECDSA_P256_SHA256, SignatureAlgorithm.ECDSA_P384_SHA384]
)
def test_raw_ecdsa_starting_like_der_is_still_converted(algorithm: SignatureAlgorithm) -> None:
    """One raw r||s in 256 begins with 0x30, the DER SEQUENCE tag (a token signature once
    failed that way); DER input of the raw length is kept as it is (both with the low s)."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from avobuild.bundle.sign import raw_ecdsa_to_der, to_der_signature

    half = 32 if algorithm is SignatureAlgorithm.ECDSA_P256_SHA256 else 48
    order = CURVE_ORDERS[algorithm]
    rng = random.Random(20261127)
    for _ in range(50):
        r = int.from_bytes(b"\x30" + rng.randbytes(half - 1), "big")
        s = int.from_bytes(rng.randbytes(half), "big") % order or 1
        raw = r.to_bytes(half, "big") + s.to_bytes(half, "big")
        stored = encode_dss_signature(r, min(s, order - s))
        assert to_der_signature(algorithm, raw) == stored
        assert raw_ecdsa_to_der(algorithm, raw) == stored
    # a canonical DER signature exactly 2 * half bytes long (two (half - 3)-byte INTEGERs and
    # six bytes of tags and lengths) stays DER
    value = int.from_bytes(b"\x01" * (half - 3), "big")
    der = encode_dss_signature(value, value)
    assert len(der) == 2 * half
    assert to_der_signature(algorithm, der) == der
    with pytest.raises(SignatureError, match="r\\|\\|s"):
        raw_ecdsa_to_der(algorithm, b"\x01" * (2 * half - 1))


def _curve_order(curve: str) -> int:
    """The group order n of a named curve, as openssl prints it (independent of the code)."""
    text = openssl("ecparam", "-name", curve, "-param_enc", "explicit", "-text", "-noout").stdout
    digits = text.split("Order:", 1)[1].split("Cofactor:", 1)[0]
    return int("".join(character for character in digits if character in "0123456789abcdef"), 16)


CURVE_ORDERS = {
    SignatureAlgorithm.ECDSA_P256_SHA256: _curve_order("prime256v1"),
    SignatureAlgorithm.ECDSA_P384_SHA384: _curve_order("secp384r1"),
}


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ECDSA_P384])
def test_ecdsa_signatures_have_one_spelling_the_low_s(
    tmp_path: Path,
    keypairs: dict[KeyAlgorithm, KeyPair],
    images: list[ImageSource],
    algorithm: KeyAlgorithm,
) -> None:
    """avobuild writes s <= n/2 (the key file, a token's raw r||s, an attached openssl
    signature); readers refuse the other spelling (r, n - s), which openssl also accepts."""
    from cryptography.hazmat.primitives.asymmetric.utils import (
        decode_dss_signature,
        encode_dss_signature,
    )

    from avobuild.bundle.resign import attach_signature, write_with_block

    pair = keypairs[algorithm]
    signature_algorithm = SignatureAlgorithm(
        "ecdsa-p256-sha256" if algorithm is KeyAlgorithm.ECDSA_P256 else "ecdsa-p384-sha384"
    )
    order = CURVE_ORDERS[signature_algorithm]
    data = b"the same bytes"
    spellings = {decode_dss_signature(sign_data(pair.private_key, data))[1] for _ in range(40)}
    assert all(s <= order // 2 for s in spellings) and len(spellings) == 40
    # an openssl signature until it comes out high, attached: stored low, and it verifies
    unsigned = make_bundle(tmp_path / "u.avb", images, unsigned=True)
    (tmp_path / "tbs.bin").write_bytes(split(unsigned)[0])
    while True:
        openssl_sign(signature_algorithm, pair.private_path, tmp_path / "tbs.bin",
                     tmp_path / "sig.der")  # fmt: skip
        made = (tmp_path / "sig.der").read_bytes()
        r, s = decode_dss_signature(made)
        if s > order // 2:
            break
    entry = attach_signature(unsigned, tmp_path / "s.avb", made, pair.public_path)
    assert decode_dss_signature(entry.signature) == (r, order - s)
    verify(tmp_path / "s.avb", pair.public_path)
    (tmp_path / "low.bin").write_bytes(entry.signature)
    assert openssl_verify(signature_algorithm, pair.public_path, tmp_path / "tbs.bin",
                          tmp_path / "low.bin").returncode == 0  # fmt: skip
    # the high spelling of the same signature, put into a bundle by hand, is refused
    parts = read_signed_parts(tmp_path / "s.avb")
    high = SignatureEntry(entry.algorithm, entry.key_id, encode_dss_signature(r, s))
    block = SignatureBlock((high,))
    with pytest.raises(SignatureError, match="must use the low s"):
        write_with_block(unsigned, tmp_path / "high.avb", parts, block)
    text = (
        f"avobuild-signatures 1\nsignature {entry.algorithm} {entry.key_id} "
        f"{base64.b64encode(high.signature).decode()}\n"
    ).encode()
    head = render_header(len(parts.manifest_bytes), len(text))
    payload = (tmp_path / "s.avb").read_bytes()[parts.payload_offset :]
    (tmp_path / "high.avb").write_bytes(head + parts.manifest_bytes + text + payload)
    with pytest.raises(SignatureError, match="must use the low s"):
        verify(tmp_path / "high.avb", pair.public_path)


def test_unsigned_needs_to_be_asked_for(tmp_path: Path, images: list[ImageSource]) -> None:
    with pytest.raises(BundleError, match="no signing key given"):
        make_bundle(tmp_path / "x.avb", images)
    assert not (tmp_path / "x.avb").exists()


# --- PKCS#11 (SoftHSM2) ----------------------------------------------------------------------

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")


@dataclass(frozen=True)
class Token:
    module: Path
    public_keys: dict[str, Path]


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """A SoftHSM2 token with an Ed25519, a P-256 and an RSA-3072 key, made in the token."""
    import pkcs11
    from pkcs11.util.ec import encode_named_curve_parameters

    from avobuild.bundle.keys import public_key_pem
    from avobuild.bundle.pkcs11 import Pkcs11Signer

    if not SOFTHSM_MODULE.exists():
        pytest.fail("softhsm2 is not installed (scripts/host-packages.d/security.txt)")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    config = root / "softhsm2.conf"
    config.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(config)
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "release",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ],
        check=True,
        capture_output=True,
    )
    library = pkcs11.lib(str(SOFTHSM_MODULE))
    token = library.get_token(token_label="release")
    with token.open(rw=True, user_pin="1234") as session:
        session.generate_keypair(pkcs11.KeyType.RSA, 3072, label="rsa", store=True)
        for label, curve in (("p256", "secp256r1"), ("ed", "curve25519")):
            if curve == "curve25519":
                parameters = session.create_domain_parameters(
                    pkcs11.KeyType.EC_EDWARDS,
                    {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")},
                    local=True,
                )
                mechanism = pkcs11.Mechanism.EC_EDWARDS_KEY_PAIR_GEN
            else:
                parameters = session.create_domain_parameters(
                    pkcs11.KeyType.EC,
                    {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters(curve)},
                    local=True,
                )
                mechanism = pkcs11.Mechanism.EC_KEY_PAIR_GEN
            parameters.generate_keypair(label=label, store=True, mechanism=mechanism)
    public_keys = {}
    for label in ("ed", "p256", "rsa"):
        with Pkcs11Signer(
            f"pkcs11:token=release;object={label}?pin-value=1234", SOFTHSM_MODULE
        ) as signer:
            public_keys[label] = root / f"{label}.pub.pem"
            public_keys[label].write_bytes(public_key_pem(signer.public_key))
    yield Token(SOFTHSM_MODULE, public_keys)
    if previous is None:
        del os.environ["SOFTHSM2_CONF"]
    else:
        os.environ["SOFTHSM2_CONF"] = previous


def test_pkcs11_signing_with_softhsm(
    tmp_path: Path,
    softhsm: Token,
    images: list[ImageSource],
    keypairs: dict[KeyAlgorithm, KeyPair],
) -> None:
    (tmp_path / "pin").write_text("1234\n")
    uris = [
        f"pkcs11:token=release;object=ed?pin-source=file:{tmp_path / 'pin'}"
        f"&module-path={softhsm.module}",
        "pkcs11:token=release;object=p256;type=private?pin-value=1234",
    ]
    bundle = tmp_path / "hsm.avb"
    avobuild_cli(
        "bundle",
        "create",
        "-o",
        bundle,
        "--name",
        "demo",
        "--version",
        "4.0",
        "--compatible",
        "acme",
        "--chunk-size",
        "64K",
        *[f"--image={s.name}={s.path}" for s in images],
        "--pkcs11",
        uris[0],
        "--pkcs11",
        uris[1],
        "--pkcs11-module",
        softhsm.module,
    )
    ring = write_toml_keyring(
        tmp_path / "hsm.toml", [softhsm.public_keys["ed"], softhsm.public_keys["p256"]], 2
    )
    assert len(verify(bundle, ring).signers) == 2
    manifest, block, payload = split(bundle)
    (tmp_path / "manifest.bin").write_bytes(manifest)
    for entry, label in zip(parse_signature_block(block).signatures, ("ed", "p256"), strict=True):
        (tmp_path / "sig.bin").write_bytes(entry.signature)
        result = openssl_verify(
            SignatureAlgorithm(entry.algorithm),
            softhsm.public_keys[label],
            tmp_path / "manifest.bin",
            tmp_path / "sig.bin",
        )
        assert result.returncode == 0, result.stderr

    # Re-sign with the token's RSA key, the PIN from the environment.
    environment = dict(
        os.environ, AVOBUILD_PKCS11_PIN="1234", AVOBUILD_PKCS11_MODULE=str(softhsm.module)
    )
    subprocess.run(
        [
            str(Path(".venv/bin/avobuild").resolve()),
            "bundle",
            "resign",
            str(bundle),
            "-o",
            str(tmp_path / "rsa.avb"),
            "--pkcs11",
            "pkcs11:token=release;object=rsa",
        ],
        check=True,
        capture_output=True,
        env=environment,
    )
    assert split(tmp_path / "rsa.avb")[2] == payload
    verify(tmp_path / "rsa.avb", softhsm.public_keys["rsa"])

    wrong_pin = avobuild_cli(
        "bundle",
        "resign",
        bundle,
        "-o",
        tmp_path / "x.avb",
        "--pkcs11",
        "pkcs11:token=release;object=rsa?pin-value=0000",
        "--pkcs11-module",
        softhsm.module,
        check=False,
    )
    assert wrong_pin.returncode == KeyError_.exit_code
    assert "cannot open the token" in wrong_pin.stderr and "0000" not in wrong_pin.stderr
    missing = avobuild_cli(
        "bundle",
        "resign",
        bundle,
        "-o",
        tmp_path / "x.avb",
        "--pkcs11",
        "pkcs11:token=release;object=nokey?pin-value=1234",
        "--pkcs11-module",
        softhsm.module,
        check=False,
    )
    assert "no private and public key pair" in missing.stderr


def test_recipe_signing_table_signs_with_every_key_and_token_key(
    tmp_path: Path, softhsm: Token
) -> None:
    """[signing] keys = [...] and pkcs11 = [...]: `bundle create RECIPE` signs once with each,
    and a keyring that needs all three signatures accepts the bundle."""
    product = write_product(tmp_path / "product")
    second, second_public = generate_keypair(tmp_path / "keys", "second", KeyAlgorithm.ECDSA_P256)
    text = product.recipe.read_text()
    old = '[signing]\nkey = "keys/bundle-signing.key.pem"\n'
    assert old in text
    product.recipe.write_text(
        text.replace(
            old,
            f'[signing]\nkey = "keys/bundle-signing.key.pem"\nkeys = ["{second}"]\n'
            'pkcs11 = ["pkcs11:token=release;object=p256?pin-value=1234"]\n'
            f'pkcs11-module = "{softhsm.module}"\n',
        )
    )
    bundle = tmp_path / "signed.avb"
    avobuild_cli("bundle", "create", product.recipe, "-o", bundle)
    ring = write_toml_keyring(
        tmp_path / "all.toml", [product.public_key, second_public, softhsm.public_keys["p256"]], 3
    )
    assert len(verify(bundle, ring).signers) == 3
    # the command line still wins over the recipe
    avobuild_cli("bundle", "create", product.recipe, "-o", tmp_path / "one.avb", "--key", second)
    _, block, _ = split(tmp_path / "one.avb")
    assert len(parse_signature_block(block).signatures) == 1


def test_pkcs11_uri_parsing() -> None:
    from avobuild.bundle.pkcs11 import parse_pkcs11_uri

    uri = parse_pkcs11_uri(
        "pkcs11:token=My%20Token;object=k;id=%01%02?pin-value=12&module-path=/m.so"
    )
    assert (uri.token, uri.object, uri.id, uri.pin, uri.module_path) == (
        "My Token",
        "k",
        b"\x01\x02",
        "12",
        Path("/m.so"),
    )
    for bad, message in (
        ("file:x", "not a PKCS#11 URI"),
        ("pkcs11:slot=1", "unsupported path"),
        ("pkcs11:object=k;type=public", "type=private"),
    ):
        with pytest.raises(KeyError_, match=message):
            parse_pkcs11_uri(bad)


def test_signature_block_with_every_algorithm_round_trips(
    keypairs: dict[KeyAlgorithm, KeyPair],
) -> None:
    from avobuild.bundle.sign import sign_manifest_with

    block = sign_manifest_with(b"manifest\n", [KeySigner(p.private_key) for p in keypairs.values()])
    data = render_signature_block(block)
    assert parse_signature_block(data) == block
    ecdsa = next(e for e in block.signatures if e.algorithm == "ecdsa-p256-sha256")
    non_canonical = data.replace(
        base64.b64encode(ecdsa.signature), base64.b64encode(ecdsa.signature + b"\0")
    )
    with pytest.raises(SignatureError, match="must be a DER ECDSA-Sig-Value"):
        parse_signature_block(non_canonical)


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.ECDSA_P384, KeyAlgorithm.RSA])
def test_offline_signing_of_the_digest_only(
    tmp_path: Path,
    keypairs: dict[KeyAlgorithm, KeyPair],
    images: list[ImageSource],
    algorithm: KeyAlgorithm,
) -> None:
    """docs/signing.md: ECDSA and RSA-PSS signers may be given the digest, not the manifest."""
    from avobuild.bundle.resign import attach_signature, signing_input

    pair = keypairs[algorithm]
    unsigned = make_bundle(tmp_path / "u.avb", images, unsigned=True)
    digest = hashlib.sha384 if algorithm is KeyAlgorithm.ECDSA_P384 else hashlib.sha256
    (tmp_path / "tbs.hash").write_bytes(digest(signing_input(unsigned)).digest())
    options = (
        []
        if algorithm is KeyAlgorithm.ECDSA_P384
        else ["-pkeyopt", "digest:sha256", "-pkeyopt", "rsa_padding_mode:pss",
              "-pkeyopt", "rsa_pss_saltlen:32"]
    )  # fmt: skip
    result = openssl("pkeyutl", "-sign", "-inkey", pair.private_path, *options,
                     "-in", tmp_path / "tbs.hash", "-out", tmp_path / "sig.bin")  # fmt: skip
    assert result.returncode == 0, result.stderr
    attach_signature(unsigned, tmp_path / "s.avb", (tmp_path / "sig.bin").read_bytes(),
                     pair.public_path)  # fmt: skip
    verify(tmp_path / "s.avb", pair.public_path)


def test_a_signing_plan_signs_any_bytes_like_a_manifest(
    tmp_path: Path, keypairs: dict[KeyAlgorithm, KeyPair], softhsm: Token
) -> None:
    """The repository index of issue 16 signs its own bytes with `plan.sign`: the same block,
    verified by the same code, by key files and token keys; the PIN and module are values."""
    from dataclasses import FrozenInstanceError

    from avobuild.bundle.signing import SigningPlan
    from avobuild.bundle.verify import verify_all_signatures

    plan = SigningPlan(
        keys=(keypairs[KeyAlgorithm.ED25519].private_path,),
        pkcs11=("pkcs11:token=release;object=p256",),
        pkcs11_module=softhsm.module,
        pkcs11_pin="1234",
    )
    assert "1234" not in repr(plan)
    with pytest.raises(FrozenInstanceError):
        plan.unsigned = True  # type: ignore[misc]
    data = b"index 1\nbundle demo-2.0.avb 1234 " + b"a" * 64 + b"\n"
    block = plan.sign(data)
    ring = load_keyring(
        write_toml_keyring(
            tmp_path / "ring.toml",
            [keypairs[KeyAlgorithm.ED25519].public_path, softhsm.public_keys["p256"]],
            2,
        )
    )
    assert len(verify_all_signatures(data, block, ring)) == 2
    with pytest.raises(SignatureError, match="does not match"):
        verify_all_signatures(data + b"x", block, ring)
    with pytest.raises(BundleError, match="cannot be given signing keys"):
        SigningPlan(keys=plan.keys, unsigned=True)


def test_the_library_never_reads_the_pkcs11_environment(
    softhsm: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the command line reads AVOBUILD_PKCS11_MODULE/PIN; a library caller passes them."""
    from avobuild.bundle.pkcs11 import Pkcs11Signer

    monkeypatch.setenv("AVOBUILD_PKCS11_MODULE", str(softhsm.module))
    monkeypatch.setenv("AVOBUILD_PKCS11_PIN", "1234")
    with pytest.raises(KeyError_, match="no PKCS#11 module"):
        Pkcs11Signer("pkcs11:token=release;object=p256")
    # Without the PIN the private key stays invisible (a public session), whatever the
    # environment holds.
    with pytest.raises(KeyError_, match=r"no private and public key pair|cannot open the token"):
        Pkcs11Signer("pkcs11:token=release;object=p256", softhsm.module)
    with Pkcs11Signer("pkcs11:token=release;object=p256", softhsm.module, "1234") as signer:
        assert signer.key_id == key_id(signer.public_key)
