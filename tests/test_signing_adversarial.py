"""Adversarial input against the full feature set: a v2 manifest (pattern, policy,
encryption) signed by Ed25519, ECDSA with a certificate chain and RSA-PSS, checked with a
threshold-3 keyring. Every byte before the payload matters, payload damage is caught before a
chunk is released, and the reader raises nothing but BundleError (and its subclasses).
"""

from __future__ import annotations

import base64
import contextlib
import io
import random
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from test_signing_certificates import BUILD_DATE, NOW, make_certificate, pem

from avobuild.bundle.header import HEADER_SIZE
from avobuild.bundle.keys import KeyAlgorithm, Keyring, generate_private_key, load_keyring
from avobuild.bundle.manifest import Policy
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.sign import KeySigner, parse_signature_block
from avobuild.bundle.writer import ImageSource, write_bundle
from avobuild.bundle.x509 import certificate_entry
from avobuild.errors import BundleError, SignatureError

SEED = 808
KEY = bytes(range(100, 132))


@dataclass(frozen=True)
class Rich:
    data: bytes
    keyring: Keyring
    payload_offset: int
    chunks: list[tuple[str, int, int, int]]  # image, index, offset, stored size


def public_pem(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> Rich:
    root = tmp_path_factory.mktemp("rich")
    ed = generate_private_key(KeyAlgorithm.ED25519)
    p256 = generate_private_key(KeyAlgorithm.ECDSA_P256)
    rsa_key = generate_private_key(KeyAlgorithm.RSA)
    ca_key = generate_private_key(KeyAlgorithm.ECDSA_P256)
    ca = make_certificate("Adversarial CA", ca_key, None, ca=True)  # type: ignore[arg-type]
    leaf = make_certificate("signer", p256, (ca, ca_key), ca=False)  # type: ignore[arg-type]
    (root / "ed.pub.pem").write_bytes(public_pem(ed))
    (root / "rsa.pub.pem").write_bytes(public_pem(rsa_key))
    (root / "ca.pem").write_bytes(pem(ca))
    (root / "ring.toml").write_text(
        'threshold = 3\nkeys = ["ed.pub.pem", "rsa.pub.pem", "ca.pem"]\n'
    )
    rng = random.Random(SEED)
    images = []
    for name, size in (("boot", 70_000), ("rootfs", 140_000), ("empty", 0)):
        path = root / f"{name}.img"
        path.write_bytes(rng.randbytes(size // 2) + bytes(size - size // 2))
        images.append(ImageSource(name, path))
    write_bundle(
        root / "rich.avb", images, name="rich", version="1.0", compatible="acme-*",
        build_date=BUILD_DATE, private_key=ed, signers=[KeySigner(p256), KeySigner(rsa_key)],
        certificates=[certificate_entry(leaf)], chunk_size=64 << 10, encryption_key=KEY,
        policy=Policy(security_version=3, min_applier_version="0.1", expires=NOW + 86400),
    )  # fmt: skip
    data = (root / "rich.avb").read_bytes()
    keyring = load_keyring(root / "ring.toml")
    with BundleReader.from_stream(io.BytesIO(data)) as reader:
        reader.verify_signature(keyring, now=NOW)
        offset = reader.payload_offset
        chunks = []
        position = offset
        for image in reader.manifest.images:
            for chunk in image.chunks:
                chunks.append((image.name, chunk.index, position, chunk.stored_size))
                position += chunk.stored_size
    assert position == len(data)
    return Rich(data, keyring, offset, chunks)


def read(data: bytes, keyring: Keyring) -> None:
    reader = BundleReader.from_stream(io.BytesIO(data), "mutated.avb")
    reader.verify_signature(keyring, now=NOW)
    reader.unlock(KEY)
    reader.verify_payload()


def test_the_rich_bundle_verifies(rich: Rich) -> None:
    read(rich.data, rich.keyring)
    manifest_end = HEADER_SIZE + int(rich.data[12:22])
    block = parse_signature_block(rich.data[manifest_end : rich.payload_offset])
    algorithms = {signature.algorithm for signature in block.signatures}
    assert algorithms == {"ed25519", "ecdsa-p256-sha256", "rsa-pss-sha256"}
    assert len(block.certificates) == 1


def test_every_byte_before_the_payload_is_protected(rich: Rich) -> None:
    rng = random.Random(SEED)
    for offset in range(rich.payload_offset):
        for mask in (0x01, 1 << rng.randrange(1, 8)):
            mutated = bytearray(rich.data)
            mutated[offset] ^= mask
            with pytest.raises(BundleError) as caught:
                read(bytes(mutated), rich.keyring)
            assert str(caught.value).startswith("mutated.avb: "), (offset, str(caught.value))


def test_payload_flips_are_refused_before_the_chunk_is_released(rich: Rich) -> None:
    rng = random.Random(SEED + 1)
    for _ in range(40):
        image, index, start, size = rng.choice(rich.chunks)
        mutated = bytearray(rich.data)
        mutated[start + rng.randrange(size)] ^= 1 << rng.randrange(8)
        reader = BundleReader.from_stream(io.BytesIO(bytes(mutated)), "p.avb")
        reader.verify_signature(rich.keyring, now=NOW)
        reader.unlock(KEY)
        released = []
        with pytest.raises(BundleError, match=f"chunk {index} of image {image} at byte offset"):
            for entry, chunk, _ in reader.iter_chunks():
                released.append((entry.name, chunk.index))
        assert (image, index) not in released


def test_truncation_at_every_chunk_boundary(rich: Rich) -> None:
    for image, index, start, size in rich.chunks:
        for cut in (start, start + 1, start + size - 1):
            with pytest.raises(BundleError, match=r"truncated at byte offset \d+") as caught:
                read(rich.data[:cut], rich.keyring)
            assert f"chunk {index} of image {image}" in str(caught.value)
    with pytest.raises(BundleError, match="unexpected data"):
        read(rich.data + b"x", rich.keyring)


def test_oversize_counts_and_lengths_in_the_signature_block() -> None:
    key_id = "a" * 64
    certificate = base64.b64encode(bytes(100)).decode()
    many = "".join(f"certificate {key_id} {base64.b64encode(bytes([n]) * 9).decode()}\n"
                   for n in range(33))  # fmt: skip
    huge = base64.b64encode(bytes((16 << 10) + 1)).decode()
    cases = [
        (f"avobuild-signatures 1\n{many}", "more than 32 certificates"),
        (f"avobuild-signatures 1\ncertificate {key_id} {huge}\n", "over the limit of 16384"),
        (f"avobuild-signatures 1\ncertificate {key_id}\n", "expected 2 values"),
        (f"avobuild-signatures 1\ncertificate {key_id} {certificate}\n" * 1, None),
        (
            f"avobuild-signatures 1\ncertificate {key_id} {certificate}\n"
            f"certificate {key_id} {certificate}\n",
            "the same certificate twice",
        ),
        (
            f"avobuild-signatures 1\nsignature ecdsa-p384-sha384 {key_id} {certificate}\n",
            "must be a DER ECDSA-Sig-Value",
        ),
    ]
    for text, message in cases:
        if message is None:
            parse_signature_block(text.encode())
            continue
        with pytest.raises(SignatureError, match=message):
            parse_signature_block(text.encode())


mutations = st.lists(
    st.tuples(
        st.sampled_from(("flip", "insert", "delete", "truncate")),
        st.floats(min_value=0, max_value=1, exclude_max=True),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, start: int, end: int, operations: list[tuple[str, float, int]]) -> bytes:
    """Mutations inside data[start:end] (the interesting region), the rest kept."""
    region = bytearray(data[start:end])
    for operation, where, value in operations:
        position = int(where * len(region)) if region else 0
        if operation == "flip" and region:
            region[position] ^= value or 1
        elif operation == "insert":
            region[position:position] = bytes([value])
        elif operation == "delete" and region:
            del region[position]
        elif operation == "truncate":
            del region[position:]
    return data[:start] + bytes(region) + data[end:]


@settings(max_examples=300)
@given(operations=mutations, whole=st.booleans())
def test_fuzz_the_rich_reader(
    rich: Rich, operations: list[tuple[str, float, int]], whole: bool
) -> None:
    """Only documented errors; the header's sizes are kept valid half of the time so the
    mutations reach the signature block and certificate parsers."""
    start, end = (0, len(rich.data)) if whole else (HEADER_SIZE, rich.payload_offset)
    data = mutate(rich.data, start, end, operations)
    if not whole:
        manifest_size = int(rich.data[12:22])
        block_size = len(data) - (len(rich.data) - rich.payload_offset) - HEADER_SIZE
        block_size -= manifest_size
        if not 1 <= block_size <= 9_999_999_999:
            return
        data = data[:23] + b"%010d" % block_size + data[33:]
    try:
        read(data, rich.keyring)
    except BundleError:
        return
    assert data == rich.data


@settings(max_examples=300)
@given(
    lines=st.lists(
        st.tuples(
            st.sampled_from(("signature", "certificate", "recipient", "x")),
            st.sampled_from(("ed25519", "ecdsa-p256-sha256", "rsa-pss-sha256", "a" * 64)),
            st.binary(max_size=120),
        ),
        max_size=5,
    )
)
def test_fuzz_signature_block_lines(lines: list[tuple[str, str, bytes]]) -> None:
    text = "avobuild-signatures 1\n" + "".join(
        f"{keyword} {field} {'b' * 64} {base64.b64encode(raw).decode()}\n"
        if keyword == "signature"
        else f"{keyword} {'b' * 64} {base64.b64encode(raw).decode() or 'x'}\n"
        for keyword, field, raw in lines
    )
    with contextlib.suppress(SignatureError):
        parse_signature_block(text.encode())


def test_the_reader_considers_a_bounded_number_of_lines(rich: Rich) -> None:
    """docs/bundle-format.md 4.2: at most 256 lines after the first, each at most 22 KiB, 32
    signatures, 32 certificates, 128 recipients. Lines are counted before any is parsed, so
    12,787 garbage lines are refused by their number, not line by line."""
    key_id = "a" * 64
    garbage = "\x1b[2J" * 3 + "\n"
    cases = [
        ("avobuild-signatures 1\n" + garbage * 12787, "12787 lines after the first, more than"),
        ("avobuild-signatures 1\n" + f"x {'a' * 78}\n" * 257, "257 lines after the first"),
        ("avobuild-signatures 1\n" + f"x {'a' * (22 << 10)}\n", "over the line limit of 22528"),
        ("avobuild-signatures 1\n" + "".join(
            f"signature a {n:064x} AAAA\n" for n in range(33)), "more than 32 signatures"),
        ("avobuild-signatures 1\n" + "".join(
            f"recipient {key_id} rsa-oaep-sha256 AAAA\n" for _ in range(129)),
         "more than 128 recipients"),
    ]  # fmt: skip
    for text, message in cases:
        with pytest.raises(SignatureError, match=message):
            parse_signature_block(text.encode())
    within = "avobuild-signatures 1\n" + f"x {'a' * 78}\n" * 256
    assert len(parse_signature_block(within.encode()).extra_lines) == 256
    # In a bundle: the same refusal, naming the bundle, before the manifest is looked at.
    manifest_size = int(rich.data[12:22])
    manifest = rich.data[HEADER_SIZE : HEADER_SIZE + manifest_size]
    block = cases[0][0].encode()
    data = b"AVOBUNDLE 1 %010d %010d\n" % (manifest_size, len(block)) + manifest + block
    with pytest.raises(SignatureError, match=r"^hostile\.avb: signature block has 12787 lines"):
        BundleReader.from_stream(io.BytesIO(data), "hostile.avb")


@pytest.mark.parametrize(
    ("where", "text"),
    [
        ("header", b"AVOBUNDLE 1 \x1b[31m\xff\xfe000 0000000100\n"),
        ("block", b"avobuild-signatures 1\n\x1b]0;owned\x07 x\n"),
        ("block-field", b"avobuild-signatures 1\nsignature \x1b[2J" + b"A" * 5000 + b" x y\n"),
        ("manifest", b"avobuild-manifest 1\ntype \x1b[31m" + b"B" * 5000 + b"\n"),
        ("delta", b"avobuild-delta 1\nsource 0 " + b"0" * 64 + b"\ntarget 0 "
         + b"0" * 64 + b"\nzero \x1b[2J 1\nend 1\n"),
    ],
)  # fmt: skip
def test_untrusted_text_is_never_echoed_raw(where: str, text: bytes) -> None:
    """Control characters, non-ASCII bytes and very long values reach a message escaped and
    cut (errors.shown), so a hostile bundle cannot drive a terminal or bloat a log."""
    from avobuild.bundle.header import parse_header
    from avobuild.bundle.manifest import parse_manifest
    from avobuild.delta.apply import ChunkStream, read_delta_header, replay_delta
    from avobuild.delta.apply import Region as DeltaRegion

    with pytest.raises(BundleError) as caught:
        if where == "header":
            parse_header(text)
        elif where.startswith("block"):
            parse_signature_block(text)
        elif where == "manifest":
            parse_manifest(text)
        else:
            stream = ChunkStream(iter([text]))
            source, target = read_delta_header(stream, "d")
            replay_delta(stream, "d", DeltaRegion(-1, 0, "s"), source,
                         DeltaRegion(-1, 0, "t"), target)  # fmt: skip
    message = str(caught.value)
    assert all(" " <= character <= "~" for character in message), message
    assert len(message) < 400, message
    assert "\\x1b" in message
