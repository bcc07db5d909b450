"""Payload encryption: AES-256-GCM per chunk, content key from a file or wrapped for recipients.

Oracles: `openssl enc -d -aes-256-ctr` plus `zstd -d` decrypt a chunk to the image bytes, as
the on-target applier does; `openssl pkeyutl -decrypt` unwraps an RSA recipient's key.
"""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

import pytest
from conftest import avobuild_cli

from avobuild.bundle.crypt import (
    DecryptionKey,
    key_commitment,
    parse_recipient,
    render_recipient,
    wrap_key,
)
from avobuild.bundle.header import HEADER_SIZE
from avobuild.bundle.keys import (
    KeyAlgorithm,
    generate_keypair,
    load_keyring,
    load_private_key,
    load_public_key,
)
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.resign import read_signed_parts, write_with_block
from avobuild.bundle.writer import ImageSource, write_bundle
from avobuild.errors import BundleError, KeyError_

CHUNK = 64 << 10
KEY = bytes(range(32))


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crypt")
    rng = random.Random(77)
    image = root / "rootfs.img"
    image.write_bytes(b"secret firmware text\n" * 5000 + rng.randbytes(50_000))
    (root / "content.key").write_text(KEY.hex() + "\n")
    files = {"root": root, "image": image, "content": root / "content.key"}
    for name, algorithm in (
        ("signer", KeyAlgorithm.ED25519),
        ("rsa", KeyAlgorithm.RSA),
        ("ec", KeyAlgorithm.ECDSA_P384),
        ("other", KeyAlgorithm.ECDSA_P256),
    ):
        private, public = generate_keypair(root, name, algorithm)
        files[name] = private
        files[f"{name}.pub"] = public
    return files


def create(material: dict[str, Path], output: Path, *options: str | Path) -> Path:
    avobuild_cli("bundle", "create", "--image", f"rootfs={material['image']}", "--name", "demo",
                 "--version", "1.0", "--compatible", "acme", "--chunk-size", "64K",
                 "--key", material["signer"], "-o", output, *options)  # fmt: skip
    return output


def read_images(bundle: Path, material: dict[str, Path], key: DecryptionKey) -> bytes:
    with BundleReader.open(bundle) as reader:
        reader.verify_signature(load_keyring(material["signer.pub"]))
        reader.unlock(key)
        return b"".join(data for _, _, data in reader.iter_chunks())


def test_key_file_encryption_and_the_openssl_ctr_oracle(
    tmp_path: Path, material: dict[str, Path]
) -> None:
    # One zstd frame per chunk (version 1 compression), so that each decrypted chunk is a
    # whole frame for the zstd command; zstd-stream encryption round trips in the next tests.
    options = ("--encryption-key", material["content"], "--compression", "zstd")
    bundle = create(material, tmp_path / "e.avb", *options)
    again = create(material, tmp_path / "again.avb", *options)
    assert bundle.read_bytes() == again.read_bytes(), "encryption must stay reproducible"
    data = bundle.read_bytes()
    assert b"secret firmware text" not in data
    plain = material["image"].read_bytes()
    assert read_images(bundle, material, KEY) == plain

    refused = avobuild_cli("bundle", "verify", bundle, "--keyring", material["signer.pub"],
                           check=False)  # fmt: skip
    assert refused.returncode == BundleError.exit_code and "payload is encrypted" in refused.stderr
    ok = avobuild_cli("bundle", "verify", bundle, "--keyring", material["signer.pub"],
                      "--decryption-key", material["content"])  # fmt: skip
    assert "OK: demo 1.0" in ok.stdout

    with BundleReader.open(bundle) as reader:
        reader.verify_signature(load_keyring(material["signer.pub"]))
        manifest = reader.manifest
        text = reader.manifest_bytes.decode()
        offset = reader.payload_offset
    assert text.startswith("avobuild-manifest 2\n")
    assert f"encryption aes-256-gcm {key_commitment(KEY)}\nimage rootfs" in text
    with pytest.raises(BundleError, match="not the one the signed manifest commits to"):
        read_images(bundle, material, bytes(32))
    # The on-target way: chunk hash first, then AES-256-CTR from counter 2, then zstd.
    image = manifest.images[0]
    for chunk in image.chunks[:2]:
        stored = data[offset : offset + chunk.stored_size]
        offset += chunk.stored_size
        nonce, ciphertext = stored[:12], stored[12:-16]
        (tmp_path / "c.bin").write_bytes(ciphertext)
        frame = subprocess.run(
            ["openssl", "enc", "-d", "-aes-256-ctr", "-K", KEY.hex(), "-iv",
             (nonce + b"\0\0\0\2").hex(), "-in", str(tmp_path / "c.bin")],
            capture_output=True, check=True,
        ).stdout  # fmt: skip
        chunk_data = subprocess.run(["zstd", "-d", "-c"], input=frame, capture_output=True,
                                    check=True).stdout  # fmt: skip
        start = chunk.index * CHUNK
        assert chunk_data == plain[start : start + CHUNK]


def test_recipients_unwrap_their_key(tmp_path: Path, material: dict[str, Path]) -> None:
    bundle = create(material, tmp_path / "r.avb", "--encrypt-for", material["rsa.pub"],
                    "--encrypt-for", material["ec.pub"])  # fmt: skip
    plain = material["image"].read_bytes()
    for name in ("rsa", "ec"):
        assert read_images(bundle, material, load_private_key(material[name])) == plain
    with pytest.raises(KeyError_, match="not encrypted for key"):
        read_images(bundle, material, load_private_key(material["other"]))
    # openssl unwraps the RSA recipient's key: its commitment is the manifest's.
    parts = read_signed_parts(bundle)
    (line,) = [x for x in parts.block.extra_lines if "rsa-oaep-sha256" in x]
    entry = parse_recipient(line)
    assert entry is not None
    (tmp_path / "wrapped.bin").write_bytes(entry.value)
    key = subprocess.run(
        ["openssl", "pkeyutl", "-decrypt", "-inkey", str(material["rsa"]), "-pkeyopt",
         "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt",
         "rsa_mgf1_md:sha256", "-in", str(tmp_path / "wrapped.bin")],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert f"encryption aes-256-gcm {key_commitment(key)}" in parts.manifest_bytes.decode()

    # A recipient line swapped for another key is caught by the signed commitment.
    forged = render_recipient(wrap_key(bytes(32), load_public_key(material["ec.pub"])))
    lines = tuple(forged if "ecdh" in x else x for x in parts.block.extra_lines)
    block = type(parts.block)(parts.block.signatures, lines, parts.block.certificates)
    write_with_block(bundle, tmp_path / "forged.avb", parts, block)
    with pytest.raises(BundleError, match="is not the one the signed manifest commits to"):
        read_images(tmp_path / "forged.avb", material, load_private_key(material["ec"]))


def test_tampered_ciphertext_is_refused_before_decryption(
    tmp_path: Path, material: dict[str, Path]
) -> None:
    bundle = create(material, tmp_path / "e.avb", "--encryption-key", material["content"])
    data = bytearray(bundle.read_bytes())
    match = re.fullmatch(rb"AVOBUNDLE 1 (\d{10}) (\d{10})\n", bytes(data[:HEADER_SIZE]))
    assert match is not None
    payload = HEADER_SIZE + int(match.group(1)) + int(match.group(2))
    rng = random.Random(9)
    for _ in range(5):
        mutated = bytearray(data)
        mutated[rng.randrange(payload, len(data))] ^= 0x04
        (tmp_path / "m.avb").write_bytes(bytes(mutated))
        with pytest.raises(BundleError, match="sha256 mismatch"):
            read_images(tmp_path / "m.avb", material, KEY)


def test_encrypted_bundle_needs_a_recipient_key_type(
    tmp_path: Path, material: dict[str, Path]
) -> None:
    result = create_fails(material, tmp_path / "x.avb", "--encrypt-for", material["signer.pub"])
    assert result.returncode == KeyError_.exit_code and "Ed25519 cannot encrypt" in result.stderr
    (tmp_path / "short.key").write_text("abcd\n")
    result = create_fails(material, tmp_path / "x.avb", "--encryption-key", tmp_path / "short.key")
    assert "32 bytes, raw or as 64 hex digits" in result.stderr
    manifest = write_bundle(tmp_path / "lib.avb", [ImageSource("rootfs", material["image"])],
                            name="d", version="1", compatible="c", build_date=0, unsigned=True,
                            chunk_size=CHUNK, encryption_key=KEY)  # fmt: skip
    assert manifest.encryption is not None
    assert manifest.encryption.key_commitment == key_commitment(KEY)


def create_fails(
    material: dict[str, Path], output: Path, *options: str | Path
) -> subprocess.CompletedProcess[str]:
    return avobuild_cli("bundle", "create", "--image", f"rootfs={material['image']}", "--name",
                        "demo", "--version", "1.0", "--compatible", "acme", "--key",
                        material["signer"], "-o", output, *options, check=False)  # fmt: skip


def test_openssl_unwraps_an_ec_recipient_key(tmp_path: Path, material: dict[str, Path]) -> None:
    """The device-side recipe of docs/signing.md: derive, HKDF, AES-256-CTR."""
    public = load_public_key(material["ec.pub"])
    entry = wrap_key(KEY, public)
    assert entry.method == "ecdh-p384-hkdf-sha256"
    point, wrapped = entry.value[:97], entry.value[97:]
    # SubjectPublicKeyInfo of a P-384 point: the fixed DER prefix, then the point.
    prefix = bytes.fromhex("3076301006072a8648ce3d020106052b81040022036200")
    (tmp_path / "eph.der").write_bytes(prefix + point)
    (tmp_path / "wrapped.bin").write_bytes(wrapped)

    def run(*args: str | Path) -> bytes:
        return subprocess.run(["openssl", *map(str, args)], capture_output=True,
                              check=True).stdout  # fmt: skip

    run("pkey", "-pubin", "-inform", "DER", "-in", tmp_path / "eph.der",
        "-out", tmp_path / "eph.pem")  # fmt: skip
    shared = run("pkeyutl", "-derive", "-inkey", material["ec"], "-peerkey", tmp_path / "eph.pem")
    mask = run("kdf", "-keylen", "32", "-kdfopt", "digest:SHA256",
               "-kdfopt", f"hexkey:{shared.hex()}", "-kdfopt", "info:avobuild key wrap",
               "-binary", "HKDF")  # fmt: skip
    key = run("enc", "-d", "-aes-256-ctr", "-K", mask.hex(), "-iv", "00" * 16,
              "-in", tmp_path / "wrapped.bin")  # fmt: skip
    assert key == KEY


def test_content_key_files_are_32_bytes_or_64_hex_digits(tmp_path: Path) -> None:
    """bundle-format.md 5.1: exactly 32 raw bytes, or 64 hex digits with only whitespace
    around them (what `openssl rand -hex 32 > FILE` writes); anything else is refused."""
    from avobuild.bundle.crypt import load_content_key

    path = tmp_path / "k"
    for data, expected in (
        (KEY, KEY),
        (KEY.hex().encode() + b"\n", KEY),
        (KEY.hex().upper().encode(), KEY),
        (b"  " + KEY.hex().encode() + b"\r\n", KEY),
    ):
        path.write_bytes(data)
        assert load_content_key(path) == expected
    spaced = " ".join(KEY.hex()[index : index + 2] for index in range(0, 64, 2)).encode()
    for data in (spaced[:64], KEY + b"\n", KEY.hex().encode()[:62], b"g" * 64):
        path.write_bytes(data)
        with pytest.raises(KeyError_, match="32 bytes, raw or as 64 hex digits"):
            load_content_key(path)
