"""zstd-stream payloads (manifest version 3, docs/bundle-format.md 5.2): round trips,
reproducible bytes, the zstd command as an independent decoder, tampering refused before the
chunk is released, and version 1 bundles still written and read on request.

The shell applier's verdicts on hostile zstd-stream bundles are in tests/test_differential.py
(`test_stream_cases_same_verdict`).
"""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
from pathlib import Path

import pytest
from conftest import avobuild_cli
from test_bundle import IMAGE_SIZES, Built, Keys, build, chunk_offsets, make_image, read_all

from avobuild.bundle.header import render_header
from avobuild.bundle.keys import load_keyring, load_private_key
from avobuild.bundle.manifest import (
    Compression,
    StreamParameters,
    parse_manifest,
    render_manifest,
)
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.sign import render_signature_block, sign_manifest
from avobuild.errors import BundleError

REPO = Path(__file__).resolve().parent.parent
STREAM = StreamParameters(frame_chunks=4, window_log=18)


@pytest.fixture(scope="module")
def keys() -> Keys:
    private_path = REPO / "keys-example" / "insecure-example.key.pem"
    public_path = REPO / "keys-example" / "insecure-example.pub.pem"
    return Keys(
        private_path, public_path, load_private_key(private_path), load_keyring(public_path)
    )


def build_stream(directory: Path, keys: Keys, **options: object) -> Built:
    return build(
        directory,
        keys,
        IMAGE_SIZES,
        compression=Compression.ZSTD_STREAM,
        stream=STREAM,
        **options,
    )


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Built:
    return build_stream(tmp_path_factory.mktemp("stream"), keys)


def open_verified(data: bytes, keys: Keys) -> BundleReader:
    reader = BundleReader.from_stream(io.BytesIO(data), "stream.avb")
    reader.verify_signature(keys.keyring)
    return reader


def test_round_trip_from_a_file_and_a_pipe(streamed: Built, keys: Keys) -> None:
    with BundleReader.open(streamed.path) as reader:
        reader.verify_signature(keys.keyring)
        assert reader.manifest.manifest_version == 3
        assert reader.manifest.stream == STREAM
        assert read_all(reader) == streamed.images
    with streamed.path.open("rb") as handle:
        piped = subprocess.run(["cat"], stdin=handle, capture_output=True, check=True).stdout
    assert read_all(open_verified(piped, keys)) == streamed.images


def test_the_manifest_line_and_chunk_lines(streamed: Built) -> None:
    text = render_manifest(streamed.manifest).decode()
    assert "\ncompression zstd-stream 4 18\n" in text
    assert text.startswith("avobuild-manifest 3\n")
    for image in streamed.manifest.images:
        data = streamed.images[image.name]
        for chunk in image.chunks:
            piece = data[chunk.index * (64 << 10) : (chunk.index + 1) * (64 << 10)]
            assert chunk.data_sha256 == hashlib.sha256(piece).hexdigest()
    assert parse_manifest(text.encode()) == streamed.manifest


def test_same_inputs_give_identical_bytes_whatever_the_threads(
    tmp_path: Path, keys: Keys, streamed: Built
) -> None:
    again = build_stream(tmp_path, keys, threads=1)
    assert again.data == streamed.data


def test_zstd_cli_decodes_each_frame_within_the_window(streamed: Built) -> None:
    """An independent decoder: the stored bytes of each frame's chunks, concatenated, are one
    zstd frame that `zstd -d --memory=2^window-log` decodes to that part of the image."""
    chunk_size = streamed.manifest.chunk_size
    data = streamed.data
    located = {
        (image.name, chunk.index): offset for image, chunk, offset in chunk_offsets(streamed)
    }
    frames = 0
    for image in streamed.manifest.images:
        for frame in streamed.manifest.frames(image):
            start = located[(image.name, frame[0].index)]
            stored = data[start : start + sum(chunk.stored_size for chunk in frame)]
            decoded = subprocess.run(
                ["zstd", "-d", "-q", "-c", f"--memory={STREAM.window_size}"],
                input=stored,
                capture_output=True,
                check=True,
            ).stdout
            first = frame[0].index * chunk_size
            assert decoded == streamed.images[image.name][first : first + len(decoded)]
            assert len(decoded) == sum(
                streamed.manifest.chunk_data_size(image, chunk.index) for chunk in frame
            )
            frames += 1
    assert frames > len(streamed.manifest.images)


def test_a_flipped_stored_byte_is_refused_before_its_chunk_is_released(
    streamed: Built, keys: Keys
) -> None:
    rng = random.Random(15)
    for image, chunk, offset in chunk_offsets(streamed):
        mutated = bytearray(streamed.data)
        mutated[offset + rng.randrange(chunk.stored_size)] ^= 0x40
        released: list[tuple[str, int]] = []
        with pytest.raises(BundleError, match="sha256 mismatch"):
            for got_image, got_chunk, _ in open_verified(bytes(mutated), keys).iter_chunks():
                released.append((got_image.name, got_chunk.index))
        assert (image.name, chunk.index) not in released
        order = [(i.name, c.index) for i in streamed.manifest.images for c in i.chunks]
        assert all(order.index(item) < order.index((image.name, chunk.index)) for item in released)


def test_a_signed_wrong_data_hash_is_refused(tmp_path: Path, keys: Keys) -> None:
    """The decoded data of each chunk is checked against its own hash, not only the image's."""
    built = build(
        tmp_path, keys, (("rootfs", 300_000),), compression=Compression.ZSTD_STREAM, stream=STREAM
    )
    manifest_text = render_manifest(built.manifest).decode()
    chunk = built.manifest.images[0].chunks[1]
    assert chunk.data_sha256 is not None
    forged = manifest_text.replace(chunk.data_sha256, hashlib.sha256(b"x").hexdigest())
    block = render_signature_block(sign_manifest(forged.encode(), keys.private_key))
    payload = built.data[-built.manifest.payload_size :]
    data = render_header(len(forged), len(block)) + forged.encode() + block + payload
    released = []
    with pytest.raises(BundleError, match="chunk 1 of image rootfs: the decompressed data"):
        for _, got, _ in open_verified(data, keys).iter_chunks():
            released.append(got.index)
    assert released == [0]


def test_version_1_is_still_written_on_request_and_read(tmp_path: Path, keys: Keys) -> None:
    old = build(tmp_path, keys, IMAGE_SIZES, compression=Compression.ZSTD)
    assert old.manifest.manifest_version == 1 and old.manifest.stream is None
    assert b"\ncompression zstd\n" in old.data
    with BundleReader.open(old.path) as reader:
        reader.verify_signature(keys.keyring)
        assert read_all(reader) == old.images


def test_bundle_create_defaults_to_zstd_stream(tmp_path: Path, keys: Keys) -> None:
    image = tmp_path / "rootfs.img"
    image.write_bytes(make_image(random.Random(3), 3_000_000))
    common = ["--name", "demo", "--version", "1.0", "--compatible", "acme"]
    common += ["--key", keys.private_path, "--image", f"rootfs={image}"]
    avobuild_cli("bundle", "create", *common, "-o", tmp_path / "new.avb")
    avobuild_cli("bundle", "create", *common, "--compression", "zstd", "-o", tmp_path / "old.avb")
    for name, version in (("new.avb", 3), ("old.avb", 1)):
        with BundleReader.open(tmp_path / name) as reader:
            reader.verify_signature(keys.keyring)
            assert reader.manifest.manifest_version == version
            assert b"".join(data for _, _, data in reader.iter_chunks()) == image.read_bytes()
    wrong = avobuild_cli(
        "bundle", "create", *common, "--compression", "xz", "-o", tmp_path / "x.avb", check=False
    )
    assert wrong.returncode != 0 and "--compression" in wrong.stderr


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("compression zstd-stream 4 18", "compression zstd-stream 4", "zstd-stream <frame"),
        ("compression zstd-stream 4 18", "compression zstd-stream 0 18", "frame-chunks"),
        ("compression zstd-stream 4 18", "compression zstd-stream 4 28", "window-log"),
        ("compression zstd-stream 4 18", "compression zstd-stream 4 018", "window-log"),
        ("compression zstd-stream 4 18", "compression zstd", "chunk: expected 4 value"),
        ("avobuild-manifest 3", "avobuild-manifest 2", "needs manifest version 3"),
    ],
)
def test_stream_manifest_errors(streamed: Built, old: str, new: str, message: str) -> None:
    text = render_manifest(streamed.manifest).decode()
    with pytest.raises(BundleError, match=message):
        parse_manifest(text.replace(old, new, 1).encode())
