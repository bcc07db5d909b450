"""The `.avb` bundle: round trips, determinism, independent readers and adversarial input.

Oracles: the images themselves (byte comparison), `openssl pkeyutl` for the signature, the
`zstd` CLI for every chunk, and the busybox sh reader printed in docs/bundle-format.md, run
under busybox with only openssl and zstd beside it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import avobuild_cli
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from avobuild.bundle.header import HEADER_SIZE, render_header
from avobuild.bundle.info import bundle_info
from avobuild.bundle.keys import (
    Keyring,
    PrivateKey,
    generate_keypair,
    key_id,
    load_keyring,
    load_private_key,
    load_public_key,
)
from avobuild.bundle.manifest import (
    EMPTY_SHA256,
    BundleType,
    ChunkEntry,
    Compression,
    ImageEntry,
    ImageRef,
    Manifest,
    parse_manifest,
    render_manifest,
)
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.sign import (
    SignatureBlock,
    SignatureEntry,
    parse_signature_block,
    render_signature_block,
    sign_manifest,
)
from avobuild.bundle.writer import ImageSource, write_bundle
from avobuild.cli.bundle import info_json
from avobuild.errors import BundleError, KeyError_, SignatureError

REPO = Path(__file__).resolve().parent.parent
SEED = 20261127
CHUNK = 64 << 10
# (name, size): a size off any chunk boundary, one just past one chunk, an exact multiple,
# and an empty image.
IMAGE_SIZES = (("rootfs", 1_234_567), ("kernel", CHUNK + 1), ("extension", 3 * CHUNK), ("empty", 0))


def make_image(rng: random.Random, size: int) -> bytes:
    """Random runs, zero runs and repetitive text: incompressible and compressible chunks."""
    out = bytearray()
    while len(out) < size:
        kind = rng.choice(("random", "zeros", "text"))
        length = rng.randint(1, 150_000)
        if kind == "random":
            out += rng.randbytes(length)
        elif kind == "zeros":
            out += bytes(length)
        else:
            out += (b"avobuild %05d\n" % rng.randint(0, 99999)) * (length // 15 + 1)
    return bytes(out[:size])


@dataclass(frozen=True)
class Keys:
    private_path: Path
    public_path: Path
    private_key: PrivateKey
    keyring: Keyring


@dataclass(frozen=True)
class Built:
    path: Path
    manifest: Manifest
    images: dict[str, bytes]

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


@pytest.fixture(scope="module")
def keys() -> Keys:
    """The committed example key, so that every bundle the tests build is reproducible."""
    private_path = REPO / "keys-example" / "insecure-example.key.pem"
    public_path = REPO / "keys-example" / "insecure-example.pub.pem"
    return Keys(
        private_path, public_path, load_private_key(private_path), load_keyring(public_path)
    )


def build(
    directory: Path,
    keys: Keys,
    sizes: tuple[tuple[str, int], ...],
    *,
    seed: int = SEED,
    output: str = "bundle.avb",
    **options: object,
) -> Built:
    rng = random.Random(seed)
    images = {name: make_image(rng, size) for name, size in sizes}
    sources = []
    for name, data in images.items():
        path = directory / f"{name}.img"
        path.write_bytes(data)
        sources.append(ImageSource(name, path))
    arguments: dict[str, object] = {
        "name": "demo",
        "version": "1.2.3",
        "compatible": "acme-x86_64-efi",
        "build_date": 1767225600,
        "private_key": keys.private_key,
        "chunk_size": CHUNK,
    }
    arguments.update(options)
    manifest = write_bundle(directory / output, sources, **arguments)  # type: ignore[arg-type]
    return Built(directory / output, manifest, images)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Built:
    return build(tmp_path_factory.mktemp("bundle"), keys, IMAGE_SIZES)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Built:
    """Small enough to flip every byte before the payload: two chunks and an empty image."""
    return build(tmp_path_factory.mktemp("small"), keys, (("boot", 70_000), ("empty", 0)))


def read_all(reader: BundleReader) -> dict[str, bytes]:
    images: dict[str, bytearray] = {image.name: bytearray() for image in reader.manifest.images}
    for image, chunk, data in reader.iter_chunks():
        assert len(images[image.name]) == chunk.index * reader.manifest.chunk_size
        images[image.name] += data
    return {name: bytes(data) for name, data in images.items()}


def refuse(data: bytes, keyring: Keyring) -> BundleError:
    """Read `data` completely; it must fail with a BundleError (any other type escapes)."""
    with pytest.raises(BundleError) as caught:
        reader = BundleReader.from_stream(io.BytesIO(data), "mutated.avb")
        reader.verify_signature(keyring)
        reader.verify_payload()
    return caught.value


def regions(data: bytes) -> tuple[int, int]:
    """Manifest and signature block sizes, parsed by hand from the header."""
    match = re.fullmatch(rb"AVOBUNDLE 1 (\d{10}) (\d{10})\n", data[:HEADER_SIZE])
    assert match is not None
    return int(match.group(1)), int(match.group(2))


def chunk_offsets(built: Built) -> Iterator[tuple[ImageEntry, ChunkEntry, int]]:
    manifest_size, signature_size = regions(built.data)
    offset = HEADER_SIZE + manifest_size + signature_size
    for image in built.manifest.images:
        for chunk in image.chunks:
            yield image, chunk, offset
            offset += chunk.stored_size


# --- round trip and determinism ------------------------------------------------------------


def test_round_trip_gives_the_images_back(bundle: Built, keys: Keys) -> None:
    with BundleReader.open(bundle.path) as reader:
        signer = reader.verify_signature(keys.keyring)
        assert signer.key_id == key_id(keys.private_key.public_key())
        assert signer.source == keys.public_path
        assert reader.manifest == bundle.manifest
        assert read_all(reader) == bundle.images
        reader.verify_payload()  # a seekable file can be read again
    manifest = bundle.manifest
    assert [image.name for image in manifest.images] == [name for name, _ in IMAGE_SIZES]
    for image in manifest.images:
        assert image.size == len(bundle.images[image.name])
        assert image.sha256 == hashlib.sha256(bundle.images[image.name]).hexdigest()
        assert image.chunk_count == -(-image.size // CHUNK)
    assert manifest.image("rootfs") is not None
    assert manifest.image("rootfs").chunk_count == 19  # type: ignore[union-attr]
    assert manifest.image("empty").chunks == ()  # type: ignore[union-attr]


def test_same_inputs_give_identical_bytes(tmp_path: Path, keys: Keys, bundle: Built) -> None:
    single = build(tmp_path, keys, IMAGE_SIZES, output="single.avb", threads=1)
    parallel = build(tmp_path, keys, IMAGE_SIZES, output="parallel.avb", threads=2)
    assert single.data == parallel.data == bundle.data
    other_date = build(tmp_path, keys, IMAGE_SIZES, output="other.avb", build_date=1)
    assert other_date.data != bundle.data


def test_compression_none_round_trip(tmp_path: Path, keys: Keys) -> None:
    built = build(tmp_path, keys, (("rootfs", 200_000),), compression=Compression.NONE)
    assert built.manifest.compression is Compression.NONE
    manifest_size, signature_size = regions(built.data)
    payload = built.data[HEADER_SIZE + manifest_size + signature_size :]
    assert payload == built.images["rootfs"]
    with BundleReader.open(built.path) as reader:
        reader.verify_signature(keys.keyring)
        assert read_all(reader) == built.images


def test_progress_reports_image_bytes(tmp_path: Path, keys: Keys) -> None:
    calls: list[tuple[int, int]] = []
    build(tmp_path, keys, IMAGE_SIZES, progress=lambda done, total: calls.append((done, total)))
    total = sum(size for _, size in IMAGE_SIZES)
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_writer_leaves_nothing_behind_on_error(tmp_path: Path, keys: Keys) -> None:
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"x" * 1000)
    cases: list[tuple[dict[str, object], str]] = [
        ({"name": "bad name"}, "name: expected"),
        ({"chunk_size": 100_000}, "chunk-size: expected a power of two"),
        ({"level": 0}, "compression level"),
    ]
    for override, message in cases:
        options: dict[str, object] = {
            "name": "demo",
            "version": "1",
            "compatible": "c",
            "build_date": 0,
            "private_key": keys.private_key,
        }
        options.update(override)
        with pytest.raises(BundleError, match=message):
            write_bundle(tmp_path / "out.avb", [ImageSource("rootfs", image)], **options)  # type: ignore[arg-type]
    with pytest.raises(BundleError, match=r"image missing: cannot read .*nowhere\.img"):
        write_bundle(
            tmp_path / "out.avb",
            [ImageSource("rootfs", image), ImageSource("missing", tmp_path / "nowhere.img")],
            name="demo",
            version="1",
            compatible="c",
            build_date=0,
            private_key=keys.private_key,
        )
    with pytest.raises(BundleError, match="image 'rootfs' is given twice"):
        write_bundle(
            tmp_path / "out.avb",
            [ImageSource("rootfs", image), ImageSource("rootfs", image)],
            name="demo",
            version="1",
            compatible="c",
            build_date=0,
            private_key=keys.private_key,
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rootfs.img"]


# --- independent oracles ---------------------------------------------------------------------


def test_openssl_verifies_the_signature(tmp_path: Path, bundle: Built, keys: Keys) -> None:
    data = bundle.data
    manifest_size, signature_size = regions(data)
    manifest = data[HEADER_SIZE : HEADER_SIZE + manifest_size]
    block = data[HEADER_SIZE + manifest_size : HEADER_SIZE + manifest_size + signature_size]
    lines = block.decode("ascii").splitlines()
    assert lines[0] == "avobuild-signatures 1"
    _, algorithm, identifier, encoded = lines[1].split(" ")
    assert algorithm == "ed25519"
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", keys.public_path, "-outform", "DER"],
        capture_output=True,
        check=True,
    ).stdout
    assert identifier == hashlib.sha256(der).hexdigest()
    (tmp_path / "manifest.bin").write_bytes(manifest)
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(encoded))
    verify = [
        "openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(keys.public_path), "-rawin",
        "-in", str(tmp_path / "manifest.bin"), "-sigfile", str(tmp_path / "sig.bin"),
    ]  # fmt: skip
    result = subprocess.run(verify, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Signature Verified Successfully" in result.stdout
    (tmp_path / "manifest.bin").write_bytes(manifest.replace(b"1.2.3", b"1.2.4"))
    assert subprocess.run(verify, capture_output=True, check=False).returncode != 0


def test_zstd_cli_decodes_every_chunk(bundle: Built) -> None:
    """A reader written from the spec alone: header by hand, manifest by split, zstd CLI."""
    data = bundle.data
    manifest_size, signature_size = regions(data)
    lines = data[HEADER_SIZE : HEADER_SIZE + manifest_size].decode("ascii").splitlines()
    chunk_size = int(lines[6].split(" ")[1])
    offset = HEADER_SIZE + manifest_size + signature_size
    images_seen = []
    for line in lines[8:]:
        fields = line.split(" ")
        if fields[0] == "image":
            images_seen.append(fields[1])
            assert int(fields[2]) == len(bundle.images[fields[1]])
            continue
        _, name, index_text, stored_text, digest = fields
        index, stored_size = int(index_text), int(stored_text)
        stored = data[offset : offset + stored_size]
        assert hashlib.sha256(stored).hexdigest() == digest
        decoded = subprocess.run(
            ["zstd", "-d", "-q", "-c"], input=stored, capture_output=True, check=True
        ).stdout
        assert decoded == bundle.images[name][index * chunk_size : (index + 1) * chunk_size]
        offset += stored_size
    assert offset == len(data), "nothing may follow the last chunk"
    assert images_seen == [name for name, _ in IMAGE_SIZES]


def documented_sh_reader() -> str:
    text = (REPO / "docs" / "bundle-format.md").read_text()
    match = re.search(r"<!-- verify-example -->\n```sh\n(.*?)```", text, re.DOTALL)
    assert match is not None, "docs/bundle-format.md lost its verify-example script"
    return match.group(1)


@pytest.fixture(scope="module")
def busybox_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH holding busybox applets, openssl and zstd, and nothing else."""
    directory = tmp_path_factory.mktemp("busybox-bin")
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox (Debian package busybox-static) is needed"
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        (directory / applet).symlink_to(busybox)
    for tool in ("openssl", "zstd"):
        found = shutil.which(tool)
        assert found is not None, f"{tool} is needed"
        (directory / tool).unlink(missing_ok=True)
        (directory / tool).symlink_to(found)
    return str(directory)


def run_sh_reader(busybox_path: str, script: Path, public: Path, work: Path, data: bytes) -> str:
    result = subprocess.run(
        [f"{busybox_path}/sh", script, public, work],
        input=data,
        capture_output=True,
        env={"PATH": busybox_path},
        check=False,
    )
    return result.stdout.decode() + result.stderr.decode()


def test_documented_busybox_reader_streams_the_bundle(
    tmp_path: Path, bundle: Built, keys: Keys, busybox_path: str
) -> None:
    script = tmp_path / "verify.sh"
    script.write_text(documented_sh_reader())
    output = run_sh_reader(busybox_path, script, keys.public_path, tmp_path / "work", bundle.data)
    assert output.strip() == "verified"
    for name, data in bundle.images.items():
        assert (tmp_path / "work" / f"{name}.img").read_bytes() == data
    # The same script refuses a flipped payload byte and trailing data.
    _, _, offset = next(chunk_offsets(bundle))
    flipped = bytearray(bundle.data)
    flipped[offset + 5] ^= 1
    output = run_sh_reader(busybox_path, script, keys.public_path, tmp_path / "w2", bytes(flipped))
    assert "refused: chunk 0 of rootfs: hash mismatch" in output
    output = run_sh_reader(
        busybox_path, script, keys.public_path, tmp_path / "w3", bundle.data + b"!"
    )
    assert "refused: trailing data" in output


# --- adversarial input -----------------------------------------------------------------------


def test_every_byte_before_the_payload_is_protected(small: Built, keys: Keys) -> None:
    data = small.data
    manifest_size, signature_size = regions(data)
    payload_offset = HEADER_SIZE + manifest_size + signature_size
    for offset in range(payload_offset):
        for mask in (0x01, 0x20, 0x80):
            mutated = bytearray(data)
            mutated[offset] ^= mask
            error = refuse(bytes(mutated), keys.keyring)
            assert str(error).startswith("mutated.avb: "), (offset, str(error))


def test_flipped_payload_bytes_are_refused_before_the_chunk_is_released(
    bundle: Built, keys: Keys
) -> None:
    rng = random.Random(SEED)
    data = bundle.data
    chunks = list(chunk_offsets(bundle))
    for _ in range(30):
        image, chunk, start = rng.choice(chunks)
        mutated = bytearray(data)
        mutated[start + rng.randrange(chunk.stored_size)] ^= 1 << rng.randrange(8)
        reader = BundleReader.from_stream(io.BytesIO(bytes(mutated)), "bundle.avb")
        reader.verify_signature(keys.keyring)
        released = []
        with pytest.raises(BundleError) as caught:
            for entry, released_chunk, payload in reader.iter_chunks():
                size = reader.manifest.chunk_size
                begin = released_chunk.index * size
                assert payload == bundle.images[entry.name][begin : begin + size]
                released.append((entry.name, released_chunk.index))
        assert (image.name, chunk.index) not in released
        assert str(caught.value).startswith(
            f"bundle.avb: chunk {chunk.index} of image {image.name} at byte offset {start}: "
            "sha256 mismatch"
        )


def test_truncation_anywhere_is_refused(bundle: Built, keys: Keys) -> None:
    data = bundle.data
    manifest_size, signature_size = regions(data)
    payload_offset = HEADER_SIZE + manifest_size + signature_size
    for cut in (0, 10, 33, 34, 34 + manifest_size - 1, 34 + manifest_size, payload_offset - 1):
        assert "truncated at byte offset" in str(refuse(data[:cut], keys.keyring))
    for image, chunk, start in chunk_offsets(bundle):
        for cut in (start, start + chunk.stored_size // 2, start + chunk.stored_size - 1):
            error = refuse(data[:cut], keys.keyring)
            assert str(error) == (
                f"mutated.avb: truncated at byte offset {cut}: expected "
                f"{start + chunk.stored_size - cut} more bytes of chunk {chunk.index} of image "
                f"{image.name}"
            )


def test_trailing_data_is_refused(bundle: Built, keys: Keys) -> None:
    error = refuse(bundle.data + b"\0", keys.keyring)
    assert f"unexpected data at byte offset {len(bundle.data)}" in str(error)


def test_bundle_from_an_untrusted_key_is_refused(tmp_path: Path, bundle: Built, keys: Keys) -> None:
    _, other_public = generate_keypair(tmp_path, "other")
    with BundleReader.open(bundle.path) as reader, pytest.raises(SignatureError) as caught:
        reader.verify_signature(load_keyring(other_public))
    signer = key_id(keys.private_key.public_key())
    assert str(caught.value) == (
        f"{bundle.path}: bundle signed by key {signer}, which is not in keyring {other_public}"
    )


def test_signature_moved_onto_another_manifest_is_refused(
    tmp_path: Path, small: Built, keys: Keys
) -> None:
    other = build(tmp_path, keys, (("boot", 70_000), ("empty", 0)), version="9.9.9")
    source_manifest, source_signatures = regions(small.data)
    block = small.data[
        HEADER_SIZE + source_manifest : HEADER_SIZE + source_manifest + source_signatures
    ]
    target_manifest, target_signatures = regions(other.data)
    forged = (
        render_header(target_manifest, len(block))
        + other.data[HEADER_SIZE : HEADER_SIZE + target_manifest]
        + block
        + other.data[HEADER_SIZE + target_manifest + target_signatures :]
    )
    error = refuse(forged, keys.keyring)
    assert isinstance(error, SignatureError)
    assert "does not match the manifest" in str(error)


def test_oversize_and_malformed_headers_are_refused_before_reading_on(keys: Keys) -> None:
    cases = [
        (render_header((16 << 20) + 1, 100), "manifest size 16777217 is out of bounds"),
        (render_header(100, (1 << 20) + 1), "signature block size 1048577 is out of bounds"),
        (render_header(0, 100), "manifest size 0 is out of bounds"),
        (b"AVOBUNDLE 2 0000000100 0000000100\n", "unsupported bundle format version '2'"),
        (b"AVB0" + bytes(30), "not an avobuild bundle"),
        (b"AVOBUNDLE 1 000000010O 0000000100\n", "malformed header"),
    ]
    for header, message in cases:
        # Nothing follows the header: a reader that tried to read on would report truncation.
        assert message in str(refuse(header, keys.keyring))


def test_manifest_is_unavailable_before_verification(bundle: Built) -> None:
    with BundleReader.open(bundle.path) as reader:
        with pytest.raises(BundleError, match="not available before its signature is verified"):
            _ = reader.manifest
        with pytest.raises(BundleError, match="not available before"):
            reader.verify_payload()
        assert reader.unverified_manifest() == bundle.manifest
        info = bundle_info(reader)
        assert info.signature_verified is False


def test_a_failing_signature_by_a_trusted_key_refuses_the_bundle(
    tmp_path: Path, small: Built, keys: Keys
) -> None:
    """A good signature does not excuse a bad one by another trusted key: that is tampering."""
    manifest_size, signature_size = regions(small.data)
    manifest = small.data[HEADER_SIZE : HEADER_SIZE + manifest_size]
    payload = small.data[HEADER_SIZE + manifest_size + signature_size :]
    good = sign_manifest(manifest, keys.private_key).signatures[0]
    second_private, second_public = generate_keypair(tmp_path, "second")
    bad = sign_manifest(b"another manifest", load_private_key(second_private)).signatures[0]
    both = tmp_path / "both.pem"
    both.write_bytes(keys.public_path.read_bytes() + second_public.read_bytes())

    block = render_signature_block(SignatureBlock((good, bad)))
    forged = render_header(manifest_size, len(block)) + manifest + block + payload
    error = refuse(forged, load_keyring(both))
    assert isinstance(error, SignatureError)
    assert f"the signature by trusted key {bad.key_id}" in str(error)
    # Where the second key is not trusted its signature is not looked at.
    reader = BundleReader.from_stream(io.BytesIO(forged))
    assert reader.verify_signature(keys.keyring).key_id == good.key_id
    reader.verify_payload()


def test_unknown_signature_lines_are_skipped(small: Built, keys: Keys) -> None:
    """Future lines and algorithms are additions: a v1 reader still verifies its own key."""
    manifest_size, signature_size = regions(small.data)
    manifest = small.data[HEADER_SIZE : HEADER_SIZE + manifest_size]
    good = sign_manifest(manifest, keys.private_key).signatures[0]
    future = SignatureEntry("ml-dsa-65", "1" * 64, b"\x30" * 70)
    block = SignatureBlock((future, good), extra_lines=("transparency-log " + "2" * 64 + " MIIB",))
    data = render_signature_block(block)
    assert parse_signature_block(data) == block
    bundle = (
        render_header(manifest_size, len(data))
        + manifest
        + data
        + small.data[HEADER_SIZE + manifest_size + signature_size :]
    )
    reader = BundleReader.from_stream(io.BytesIO(bundle))
    assert reader.verify_signature(keys.keyring).key_id == good.key_id
    reader.verify_payload()
    only_future = render_signature_block(SignatureBlock((future,)))
    error = refuse(
        render_header(manifest_size, len(only_future)) + manifest + only_future, keys.keyring
    )
    assert "only signatures this avobuild cannot check: ml-dsa-65" in str(error)
    unsigned = render_signature_block(SignatureBlock(()))
    error = refuse(render_header(manifest_size, len(unsigned)) + manifest + unsigned, keys.keyring)
    assert "unsigned" in str(error)


def signed_bundle(manifest: Manifest, payload: bytes, keys: Keys) -> bytes:
    manifest_bytes = render_manifest(manifest)
    block = render_signature_block(sign_manifest(manifest_bytes, keys.private_key))
    return render_header(len(manifest_bytes), len(block)) + manifest_bytes + block + payload


def test_lying_zstd_frames_are_refused_even_when_signed(keys: Keys) -> None:
    """Decompression is capped by the signed sizes: a trusted signer cannot bomb a reader."""
    import zstandard

    data = b"a" * CHUNK
    frames = {
        "more than declared": zstandard.ZstdCompressor().compress(data + b"b"),
        "no content size": zstandard.ZstdCompressor(write_content_size=False).compress(data),
        "two frames": zstandard.ZstdCompressor().compress(data[:10])
        + zstandard.ZstdCompressor().compress(data[10:]),
        "not zstd": b"garbage!",
    }
    expected = {
        "more than declared": f"is a zstd frame of {CHUNK + 1} bytes, expected {CHUNK}",
        "no content size": "without a content size",
        "two frames": "is a zstd frame of 10 bytes",
        "not zstd": "is not a zstd frame",
    }
    for case, stored in frames.items():
        chunk = ChunkEntry(0, len(stored), hashlib.sha256(stored).hexdigest())
        image = ImageEntry("rootfs", CHUNK, hashlib.sha256(data).hexdigest(), (chunk,))
        manifest = Manifest("demo", "1", "c", 0, CHUNK, Compression.ZSTD, (image,))
        error = refuse(signed_bundle(manifest, stored, keys), keys.keyring)
        assert "chunk 0 of image rootfs at byte offset" in str(error), case
        assert expected[case] in str(error), (case, str(error))


def test_image_hash_is_checked_before_the_last_chunk_is_released(keys: Keys) -> None:
    import zstandard

    data = bytes(range(256)) * 512
    stored = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    chunk = ChunkEntry(0, len(stored), hashlib.sha256(stored).hexdigest())
    image = ImageEntry("rootfs", len(data), "0" * 64, (chunk,))
    manifest = Manifest("demo", "1", "c", 0, CHUNK * 2, Compression.ZSTD, (image,))
    reader = BundleReader.from_stream(io.BytesIO(signed_bundle(manifest, stored, keys)))
    reader.verify_signature(keys.keyring)
    with pytest.raises(BundleError, match="image rootfs: sha256 of the decompressed image"):
        next(reader.iter_chunks())


# --- streaming -------------------------------------------------------------------------------


def pipe_reader(data: bytes, rng: random.Random) -> tuple[io.BufferedReader, threading.Thread]:
    """A pipe fed by a thread in random-sized pieces, as from `wget -O - | avobuild …`."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb", buffering=0) as pipe:
            offset = 0
            while offset < len(data):
                size = rng.randint(1, 100_000)
                try:
                    pipe.write(data[offset : offset + size])
                except BrokenPipeError:
                    return
                offset += size

    writer = threading.Thread(target=feed)
    writer.start()
    return os.fdopen(read_fd, "rb"), writer


def test_streaming_from_a_pipe_matches_the_file(bundle: Built, keys: Keys) -> None:
    rng = random.Random(SEED)
    stream, writer = pipe_reader(bundle.data, rng)
    with stream:
        reader = BundleReader.from_stream(stream)
        reader.verify_signature(keys.keyring)
        assert read_all(reader) == bundle.images
        with pytest.raises(BundleError, match="can be read only once"):
            reader.verify_payload()
    writer.join()
    truncated = bundle.data[: len(bundle.data) - 7]
    stream, writer = pipe_reader(truncated, rng)
    with (
        stream,
        pytest.raises(BundleError, match=f"<stdin>: truncated at byte offset {len(truncated)}"),
    ):
        reader = BundleReader.from_stream(stream)
        reader.verify_signature(keys.keyring)
        reader.verify_payload()
    writer.join()


# --- manifest and signature block text -------------------------------------------------------


def test_manifest_round_trip_and_info(bundle: Built, keys: Keys) -> None:
    text = render_manifest(bundle.manifest)
    assert parse_manifest(text) == bundle.manifest
    with BundleReader.open(bundle.path) as reader:
        reader.verify_signature(keys.keyring)
        # The CLI's --json object, which keeps the keys `bundle info --json` always had.
        info = json.loads(json.dumps(info_json(bundle_info(reader))))
    assert info["signature_verified"] is True
    assert info["signer"] == key_id(keys.private_key.public_key())
    assert info["total_size"] == len(bundle.data)
    assert info["signatures"] == [
        {"algorithm": "ed25519", "key_id": info["signer"], "supported": True}
    ]
    assert [(image["name"], image["size"], image["chunks"]) for image in info["images"]] == [
        (image.name, image.size, image.chunk_count) for image in bundle.manifest.images
    ]
    assert (info["name"], info["version"], info["compatible"]) == (
        "demo",
        "1.2.3",
        "acme-x86_64-efi",
    )


LAST_LINE = f"image empty 0 {EMPTY_SHA256} 0\n"
VALID_MANIFEST = (
    "avobuild-manifest 1\n"
    "type full\n"
    "name demo\n"
    "version 1.0\n"
    "compatible acme\n"
    "build-date 0\n"
    "chunk-size 65536\n"
    "compression zstd\n"
    f"image boot 70000 {'a' * 64} 2\n"
    f"chunk boot 0 100 {'b' * 64}\n"
    f"chunk boot 1 50 {'c' * 64}\n" + LAST_LINE
)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "chunk-size 65536",
            "chunk-size 123",
            "line 7: chunk-size: expected a power of two between 65536 and 16777216, got '123'",
        ),
        ("chunk-size 65536", "chunk-size 065536", "line 7: chunk-size"),
        ("avobuild-manifest 1", "avobuild-manifest 4", "line 1: unsupported manifest version '4'"),
        ("avobuild-manifest 1", "avobuild-manifest 2", "line 1: manifest version 2 for a manifest"),
        ("compatible acme", "compatible acme-*", "line 5: compatible: expected 1-128"),
        (
            "build-date 0\n",
            "build-date 0\nexpires 5\n",
            "line 7: expected a line starting with 'chunk-size', got 'expires' (out of order, "
            "repeated, or in a version 1 manifest)",
        ),
        ("type full", "type patch", "line 2: type: expected 'full' or 'delta', got 'patch'"),
        ("name demo", "name  demo", "line 3: fields must be separated by exactly one space"),
        ("name demo", "name demo ", "line 3: fields must be separated"),
        ("name demo", "name dé", "line 3: byte 0xc3 is not ASCII"),
        ("version 1.0", "version 1.0\r", "line 4: version: expected"),
        ("compatible acme\n", "", "line 5: expected a line starting with 'compatible'"),
        ("build-date 0", "build-date -1", "line 6: build-date: expected a decimal"),
        (
            "compression zstd",
            "compression xz",
            "line 8: compression: expected 'zstd', 'none' or 'zstd-stream",
        ),
        ("image boot 70000", "image Boot 70000", "line 9: image name: expected"),
        ("70000 " + "a" * 64, "70000 " + "A" * 64, "line 9: image boot: sha256"),
        (" 2\nchunk", " 3\nchunk", "line 9: image boot: chunk-count: expected 2"),
        ("chunk boot 1", "chunk boot 2", "line 11: expected the line of chunk 1 of image boot"),
        ("chunk boot 1 50", "chunk boot 1 0", "line 11: chunk 1 of image boot: stored-size"),
        ("chunk boot 0 100", "chunk boot 0 66561", "line 10: chunk 0 of image boot: stored-size"),
        (f"image empty 0 {EMPTY_SHA256}", f"image empty 0 {'d' * 64}", "line 12: image empty"),
        ("image empty", "image boot", "line 12: image 'boot' is listed twice"),
        (
            "image empty 0",
            "imagine empty 0",
            "line 12: expected a line starting with 'image', got "
            "unknown keyword 'imagine' (not part of manifest version 2)",
        ),
        (f"image empty 0 {EMPTY_SHA256} 0\n", "", None),
        (
            LAST_LINE,
            LAST_LINE + "security-version 3\n",
            "line 13: expected a line starting "
            "with 'image', got 'security-version' (out of order, repeated, or in a version 1 "
            "manifest)",
        ),
        (LAST_LINE, LAST_LINE[:-1], "line 12: not terminated by a newline"),
        (LAST_LINE, LAST_LINE + "\n", "line 13: empty line"),
        (
            f"chunk boot 1 50 {'c' * 64}\n" + LAST_LINE,
            "",
            "line 11: the manifest ends where a 'chunk' line was expected",
        ),
        (
            f"chunk boot 1 50 {'c' * 64}\n",
            "",
            "line 11: expected a line starting with 'chunk', "
            "got 'image' (out of order or repeated)",
        ),
    ],
)
def test_manifest_errors_name_the_line(old: str, new: str, message: str | None) -> None:
    assert old in VALID_MANIFEST
    text = VALID_MANIFEST.replace(old, new, 1).encode()
    if message is None:
        parse_manifest(text)
        return
    with pytest.raises(BundleError) as caught:
        parse_manifest(text)
    assert str(caught.value).startswith(f"manifest {message}"), str(caught.value)


def test_manifest_without_images_is_refused() -> None:
    text = VALID_MANIFEST.split("image ")[0].encode()
    with pytest.raises(BundleError, match="line 9: the manifest ends without listing an image"):
        parse_manifest(text)


def test_signature_block_errors() -> None:
    key = "a" * 64
    signature = base64.b64encode(bytes(64)).decode()
    good = f"avobuild-signatures 1\nsignature ed25519 {key} {signature}\n"
    assert parse_signature_block(good.encode()).signatures[0].signature == bytes(64)
    cases = [
        (good.replace("signatures 1", "signatures 2"), "line 1: unsupported signature block"),
        (good.replace(signature, signature[:85] + "B=="), "line 2: signature: expected canonical"),
        (good.replace(signature, base64.b64encode(bytes(63)).decode()), "is 64 bytes, got 63"),
        (good.replace(key, key.upper()), "line 2: signature: key-id"),
        (good + good.splitlines()[1] + "\n", "line 3: a second signature by key"),
        (good.replace(f" {signature}", ""), "line 2: signature: expected 3 values"),
        (good + "Certificate x\n", "line 3: expected a keyword"),
        (good[:-1], "line 2: not terminated by a newline"),
    ]
    for text, message in cases:
        with pytest.raises(SignatureError, match=re.escape(message)):
            parse_signature_block(text.encode())


# --- keys ------------------------------------------------------------------------------------


def test_keys(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path / "new", "release")
    assert private_path.name == "release.key.pem"
    assert public_path.name == "release.pub.pem"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private_path.read_bytes()
    with pytest.raises(KeyError_, match="already exists"):
        generate_keypair(tmp_path / "new", "release")
    public_key = load_public_key(public_path)
    assert key_id(public_key) == key_id(load_private_key(private_path).public_key())

    _, second_public = generate_keypair(tmp_path / "second")
    both = tmp_path / "both.pem"
    both.write_bytes(
        b"# two trusted keys\n" + public_path.read_bytes() + second_public.read_bytes()
    )
    assert len(load_keyring(both).keys) == 2
    ring = tmp_path / "ring"
    ring.mkdir()
    shutil.copy(public_path, ring / "a.pem")
    shutil.copy(second_public, ring / "b.pem")
    shutil.copy(second_public, ring / "c.pem")
    (ring / "notes.txt").write_text("ignored")
    keyring = load_keyring(ring)
    assert [key.source.name for key in keyring.keys] == ["a.pem", "b.pem"]
    assert keyring.find(key_id(public_key)) is not None

    with pytest.raises(KeyError_, match=r"new: PEM block 1 is a private key|private key"):
        load_keyring(tmp_path / "new")
    with pytest.raises(KeyError_, match="keyring not found"):
        load_keyring(tmp_path / "nowhere")
    with pytest.raises(KeyError_, match="holds a public key; signing needs the private key"):
        load_private_key(public_path)
    (tmp_path / "garbage.pem").write_text("hello")
    with pytest.raises(KeyError_, match=r"garbage\.pem: not a readable PEM private key"):
        load_private_key(tmp_path / "garbage.pem")

    ecdsa = ec.generate_private_key(ec.SECP224R1())
    (tmp_path / "ec.key.pem").write_bytes(
        ecdsa.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "ec.pub.pem").write_bytes(
        ecdsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyError_, match=r"ec\.key\.pem: ECDSA secp224r1 keys are not supported"):
        load_private_key(tmp_path / "ec.key.pem")
    with pytest.raises(KeyError_, match=r"ec\.pub\.pem: ECDSA secp224r1 keys are not supported"):
        load_keyring(tmp_path / "ec.pub.pem")


def test_the_documented_example_is_what_avobuild_writes(tmp_path: Path, keys: Keys) -> None:
    """docs/bundle-format.md shows a real bundle: rebuild it and find it in the text."""
    (tmp_path / "kernel.img").write_bytes((b"avobuild example kernel\n" * 5000)[:100_000])
    (tmp_path / "rootfs.img").write_bytes(bytes(70_000))
    manifest = write_bundle(
        tmp_path / "demo.avb",
        [
            ImageSource("kernel", tmp_path / "kernel.img"),
            ImageSource("rootfs", tmp_path / "rootfs.img"),
        ],
        name="demo",
        version="1.0.0",
        compatible="avocado-x86_64-efi",
        build_date=1767225600,
        private_key=keys.private_key,
        chunk_size=CHUNK,
    )
    data = (tmp_path / "demo.avb").read_bytes()
    manifest_size, signature_size = regions(data)
    doc = (REPO / "docs" / "bundle-format.md").read_text()
    assert data[:HEADER_SIZE].decode() in doc
    assert render_manifest(manifest).decode() in doc
    block = data[HEADER_SIZE + manifest_size : HEADER_SIZE + manifest_size + signature_size]
    assert block.decode().splitlines()[1] in doc


def test_example_keys_are_a_pair() -> None:
    private_key = load_private_key(REPO / "keys-example" / "insecure-example.key.pem")
    public_key = load_public_key(REPO / "keys-example" / "insecure-example.pub.pem")
    assert key_id(private_key.public_key()) == key_id(public_key)
    readme = (REPO / "keys-example" / "README.md").read_text()
    assert "INSECURE" in readme
    assert key_id(public_key) in readme


# --- fuzzing ---------------------------------------------------------------------------------

mutations = st.lists(
    st.tuples(
        st.sampled_from(("flip", "insert", "delete", "truncate")),
        st.floats(min_value=0, max_value=1, exclude_max=True),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, operations: list[tuple[str, float, int]]) -> bytes:
    result = bytearray(data)
    for operation, where, value in operations:
        position = int(where * len(result)) if result else 0
        if operation == "flip" and result:
            result[position] ^= value or 1
        elif operation == "insert":
            result[position:position] = bytes([value])
        elif operation == "delete" and result:
            del result[position]
        elif operation == "truncate":
            del result[position:]
    return bytes(result)


@settings(max_examples=1000)
@given(operations=mutations)
def test_fuzz_parse_manifest(operations: list[tuple[str, float, int]]) -> None:
    text = mutate(VALID_MANIFEST.encode(), operations)
    try:
        manifest = parse_manifest(text)
    except BundleError:
        return
    assert render_manifest(manifest) == text, "a manifest has one spelling"


@settings(max_examples=1000)
@given(data=st.binary(max_size=400))
def test_fuzz_parse_manifest_arbitrary_bytes(data: bytes) -> None:
    for parse in (parse_manifest, parse_signature_block):
        with contextlib.suppress(BundleError):
            parse(data)


@settings(max_examples=1000)
@given(operations=mutations)
def test_fuzz_reader(small: Built, keys: Keys, operations: list[tuple[str, float, int]]) -> None:
    original = small.data
    data = mutate(original, operations)
    try:
        reader = BundleReader.from_stream(io.BytesIO(data), "fuzz.avb")
        bundle_info(reader)
    except BundleError:
        pass
    try:
        reader = BundleReader.from_stream(io.BytesIO(data), "fuzz.avb")
        reader.verify_signature(keys.keyring)
        reader.verify_payload()
    except BundleError:
        return
    assert data == original, "only the unmodified bundle verifies"


def test_delta_manifest_round_trip() -> None:
    """Delta images carry the source they need and the target they produce, signed."""
    source = ImageRef(4096, "a" * 64)
    target = ImageRef(8192, "b" * 64)
    image = ImageEntry("rootfs", 10, "c" * 64, (ChunkEntry(0, 19, "d" * 64),), source, target)
    manifest = Manifest(
        name="p",
        version="2",
        compatible="c",
        build_date=0,
        chunk_size=1 << 20,
        compression=Compression.ZSTD,
        images=(image,),
        type=BundleType.DELTA,
    )
    data = render_manifest(manifest)
    assert b"type delta\n" in data
    assert f"source 4096 {'a' * 64}\ntarget 8192 {'b' * 64}\nchunk ".encode() in data
    assert parse_manifest(data) == manifest
    # A full manifest must not carry source/target lines, a delta one must.
    with pytest.raises(BundleError, match="source"):
        parse_manifest(data.replace(b"type delta", b"type full"))
    missing = data.replace(f"target 8192 {'b' * 64}\n".encode(), b"")
    with pytest.raises(BundleError, match="target"):
        parse_manifest(missing)


def test_hypothesis_runs_from_the_one_derandomized_profile() -> None:
    active = settings()
    assert active.derandomize and active.database is None and active.deadline is None


def test_info_json_of_a_delta_bundle_keeps_every_key(tmp_path: Path, keys: Keys) -> None:
    """`bundle info --json` is an interface: the same keys, and source/target for deltas."""
    payload = tmp_path / "stream"
    payload.write_bytes(b"x" * 1000)
    source, target = ImageRef(5, "a" * 64), ImageRef(7, "b" * 64)
    write_bundle(tmp_path / "d.avb", [ImageSource("rootfs", payload, source, target)],
                 name="p", version="2", compatible="c", build_date=0,
                 private_key=keys.private_key, chunk_size=64 << 10)  # fmt: skip
    result = avobuild_cli("bundle", "info", tmp_path / "d.avb", "--json")
    info = json.loads(result.stdout)
    assert sorted(info) == [
        "build_date", "certificates", "chunk_size", "compatible", "compression", "encryption",
        "expires", "file", "format", "images", "manifest_size", "manifest_version",
        "min_applier_version", "name", "payload_offset", "payload_size", "security_version",
        "signature_block_size", "signature_verified", "signatures", "signer", "signers",
        "total_size", "type", "version",
    ]  # fmt: skip
    assert info["type"] == "delta" and info["compression"] == "zstd"
    (image,) = info["images"]
    assert image["source"] == {"size": 5, "sha256": "a" * 64}
    assert image["target"] == {"size": 7, "sha256": "b" * 64}
    assert sorted(image) == ["chunks", "name", "sha256", "size", "source", "stored_size", "target"]
