"""Writing an `.avb` bundle (docs/bundle-format.md, section 8).

`write_bundle` streams each image chunk by chunk, compressing a bounded window of chunks in
parallel (zstandard releases the GIL) while keeping their order, so memory stays at a few
chunks whatever the image size, and the same inputs always give the same bytes. The payload
goes to a temporary file beside the output; header, manifest, signature block and payload
are then written to a temporary name and renamed, so a bundle is never seen half-written.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import zstandard

from avobuild.bundle import crypt
from avobuild.bundle.header import render_header
from avobuild.bundle.keys import PrivateKey, PublicKey
from avobuild.bundle.manifest import (
    DEFAULT_CHUNK_SIZE,
    MAX_MANIFEST_SIZE,
    BundleType,
    ChunkEntry,
    Compression,
    Encryption,
    ImageEntry,
    ImageRef,
    Manifest,
    Policy,
    StreamParameters,
    check_build_date,
    check_chunk_size,
    check_compatible,
    check_identifier,
    check_image_name,
    check_policy,
    check_stream,
    chunk_count,
    max_stored_size,
    render_manifest,
)
from avobuild.bundle.sign import (
    CertificateEntry,
    KeySigner,
    Signer,
    render_signature_block,
    sign_manifest_with,
)
from avobuild.errors import BundleError

DEFAULT_LEVEL = 10
# zstd-stream defaults (docs/bundle-format.md 5.2): 64 chunks (64 MiB) per frame, so an
# interrupted install resumes at most 64 MiB back, and a 16 MiB window, which a device
# decodes in about 17 MiB of memory (the bound format version 1 already had for a chunk).
DEFAULT_STREAM = StreamParameters(frame_chunks=64, window_log=24)
_COPY_BLOCK = 1 << 20

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageSource:
    """An image to put into a bundle: its name in the manifest and the file holding it."""

    name: str
    path: Path
    # Delta bundles: `path` holds a delta that turns image `source` into image `target`.
    source: ImageRef | None = None
    target: ImageRef | None = None


class _ChunkEncoder:
    """Compresses chunks on worker threads, one zstd context per thread.

    Frames are single-threaded, carry their content size and no checksum (the manifest's
    sha256 covers them), so the output depends only on the data and the level.
    """

    def __init__(
        self, compression: Compression, level: int, content_key: bytes | None = None
    ) -> None:
        self._compression = compression
        self._level = level
        self._content_key = content_key
        self._local = threading.local()

    def encode(self, data: bytes, image: str = "", index: int = 0) -> tuple[bytes, str, int]:
        if self._compression is Compression.NONE:
            stored = data
        else:
            compressor: zstandard.ZstdCompressor | None = getattr(self._local, "compressor", None)
            if compressor is None:
                compressor = zstandard.ZstdCompressor(
                    level=self._level,
                    write_content_size=True,
                    write_checksum=False,
                    write_dict_id=False,
                    threads=0,
                )
                self._local.compressor = compressor
            stored = compressor.compress(data)
        if self._content_key is not None:
            stored = crypt.encrypt_chunk(self._content_key, image, index, stored)
        return stored, hashlib.sha256(stored).hexdigest(), len(data)


def write_bundle(
    output: Path,
    images: Sequence[ImageSource],
    *,
    name: str,
    version: str,
    compatible: str,
    build_date: int,
    private_key: PrivateKey | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = DEFAULT_LEVEL,
    threads: int | None = None,
    progress: Progress | None = None,
    compression: Compression = Compression.ZSTD,
    signers: Sequence[Signer] = (),
    certificates: Sequence[CertificateEntry] = (),
    unsigned: bool = False,
    policy: Policy | None = None,
    encryption_key: bytes | None = None,
    recipients: Sequence[PublicKey] = (),
    stream: StreamParameters = DEFAULT_STREAM,
) -> Manifest:
    """Write a signed bundle of `images` to `output` atomically; return its manifest.

    The manifest is signed by `private_key` and every one of `signers` (an HSM key, a second
    key); `certificates` go into the signature block. `unsigned=True` writes a bundle with an
    empty signature block, to be signed offline (docs/signing.md). `policy` adds the
    installation policy lines (manifest version 2). `encryption_key` (32 bytes) or
    `recipients` (RSA/EC public keys; a random key is made for them) encrypt the payload
    (avobuild/bundle/crypt.py). `threads` defaults to the number of CPUs;
    `progress(done, total)` counts image bytes. `stream` cuts a `zstd-stream` payload
    into frames (ignored by the other compressions).
    """
    check_identifier("name", name)
    check_identifier("version", version)
    check_compatible(compatible)
    all_signers: list[Signer] = [KeySigner(private_key)] if private_key is not None else []
    all_signers.extend(signers)
    if unsigned and all_signers:
        raise BundleError("an unsigned bundle cannot be given signing keys")
    if not unsigned and not all_signers:
        raise BundleError("no signing key given (pass a key, or make an unsigned bundle)")
    if policy is not None:
        check_policy(policy)
    if recipients and encryption_key is None:
        encryption_key = secrets.token_bytes(crypt.KEY_SIZE)
    if encryption_key is not None and len(encryption_key) != crypt.KEY_SIZE:
        raise BundleError(f"the encryption key must be {crypt.KEY_SIZE} bytes")
    recipient_lines = tuple(
        crypt.render_recipient(crypt.wrap_key(encryption_key, recipient))
        for recipient in recipients
        if encryption_key is not None
    )
    check_build_date(build_date)
    check_chunk_size(chunk_size)
    streamed = compression is Compression.ZSTD_STREAM
    if streamed:
        check_stream(stream)
    if compression is not Compression.NONE and not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise BundleError(
            f"compression level: expected 1 to {zstandard.MAX_COMPRESSION_LEVEL}, got {level}"
        )
    if not images:
        raise BundleError("a bundle needs at least one image")
    deltas = [source.target is not None and source.source is not None for source in images]
    if any(deltas) and not all(deltas):
        raise BundleError("a bundle holds either full images or deltas, not both")
    bundle_type = BundleType.DELTA if all(deltas) else BundleType.FULL
    seen: set[str] = set()
    for source in images:
        check_image_name(source.name)
        if source.name in seen:
            raise BundleError(f"image {source.name!r} is given twice")
        seen.add(source.name)
    sizes = [_image_size(source) for source in images]
    bound = _manifest_size_bound(images, sizes, chunk_size, compression, encrypted=True)
    if bound > MAX_MANIFEST_SIZE:
        raise BundleError(
            f"the manifest could reach {bound} bytes, over the limit of {MAX_MANIFEST_SIZE}; "
            f"use a larger chunk size than {chunk_size}"
        )
    directory = output.parent
    if not directory.is_dir():
        raise BundleError(f"{output}: directory {directory} does not exist")

    workers = max(1, threads if threads is not None else (os.cpu_count() or 1))
    report = progress or _no_progress
    total = sum(sizes)
    report(0, total)
    try:
        with (
            tempfile.TemporaryFile(dir=directory, prefix=f".{output.name}.payload.") as payload,
            ThreadPoolExecutor(workers, thread_name_prefix="avobuild-zstd") as pool,
        ):
            writer: _PayloadWriter | _StreamWriter
            if streamed:
                frames = _FrameEncoder(level, stream, chunk_size, encryption_key)
                writer = _StreamWriter(payload, pool, workers + 1, frames, chunk_size, stream)
            else:
                encoder = _ChunkEncoder(compression, level, encryption_key)
                writer = _PayloadWriter(payload, pool, 2 * workers, encoder, chunk_size)
            entries = []
            for source, size in zip(images, sizes, strict=True):
                entries.append(writer.add_image(source, size, lambda done: report(done, total)))
            entries = [
                replace(entry, source=source.source, target=source.target)
                for entry, source in zip(entries, images, strict=True)
            ]
            manifest = Manifest(
                name=name,
                version=version,
                compatible=compatible,
                build_date=build_date,
                chunk_size=chunk_size,
                compression=compression,
                images=tuple(entries),
                type=bundle_type,
                policy=policy or Policy(),
                encryption=(
                    Encryption(crypt.key_commitment(encryption_key))
                    if encryption_key is not None
                    else None
                ),
                stream=stream if streamed else None,
            )
            manifest_bytes = render_manifest(manifest)
            block = sign_manifest_with(manifest_bytes, all_signers, certificates)
            block = replace(block, extra_lines=block.extra_lines + recipient_lines)
            signature_bytes = render_signature_block(block)
            header = render_header(len(manifest_bytes), len(signature_bytes))
            _assemble(output, (header, manifest_bytes, signature_bytes), payload)
    except OSError as error:
        raise BundleError(f"{output}: cannot write bundle: {error}") from None
    report(total, total)
    return manifest


def _no_progress(_done: int, _total: int) -> None:
    pass


def _image_size(source: ImageSource) -> int:
    try:
        with source.path.open("rb") as handle:
            return handle.seek(0, os.SEEK_END)
    except OSError as error:
        raise BundleError(
            f"image {source.name}: cannot read {source.path}: {error.strerror or error}"
        ) from None


def _manifest_size_bound(
    images: Sequence[ImageSource],
    sizes: Sequence[int],
    chunk_size: int,
    compression: Compression,
    encrypted: bool = False,
) -> int:
    """An upper bound of the manifest's size, to refuse before compressing anything."""
    stored_digits = len(str(max_stored_size(chunk_size, compression, encrypted)))
    bound = 8 * 160
    for source, size in zip(images, sizes, strict=True):
        count = chunk_count(size, chunk_size)
        bound += len(source.name) + 2 * 20 + 64 + 10
        bound += count * (len(source.name) + len(str(count)) + stored_digits + 64 + 10)
    return bound


class _PayloadWriter:
    """Appends images to the payload file chunk by chunk, at most `window` chunks in flight."""

    def __init__(
        self,
        payload: BinaryIO,
        pool: ThreadPoolExecutor,
        window: int,
        encoder: _ChunkEncoder,
        chunk_size: int,
    ) -> None:
        self._payload = payload
        self._pool = pool
        self._window = window
        self._encoder = encoder
        self._chunk_size = chunk_size
        self.done = 0

    def add_image(
        self, source: ImageSource, size: int, report: Callable[[int], None]
    ) -> ImageEntry:
        image_hash = hashlib.sha256()
        chunks: list[ChunkEntry] = []
        pending: deque[Future[tuple[bytes, str, int]]] = deque()

        def store_oldest() -> None:
            stored, digest, data_size = pending.popleft().result()
            self._payload.write(stored)
            chunks.append(ChunkEntry(len(chunks), len(stored), digest))
            self.done += data_size
            report(self.done)

        try:
            for index, data in enumerate(_read_chunks(source, size, self._chunk_size)):
                image_hash.update(data)
                pending.append(self._pool.submit(self._encoder.encode, data, source.name, index))
                if len(pending) >= self._window:
                    store_oldest()
            while pending:
                store_oldest()
        finally:
            for future in pending:
                future.cancel()
        return ImageEntry(source.name, size, image_hash.hexdigest(), tuple(chunks))


@dataclass(frozen=True)
class _EncodedChunk:
    stored: bytes
    sha256: str
    data_sha256: str
    data_size: int


class _FrameEncoder:
    """Compresses one frame of a zstd-stream payload: `frame_chunks` chunks read from the
    image file, one zstd stream flushed at every chunk boundary (FLUSH_BLOCK), so that each
    chunk's stored bytes end on a block boundary and decode to exactly that chunk's data.

    Frames are independent, so they are compressed in parallel, one thread each; a frame is
    single-threaded and carries its content size and no checksum, so its bytes depend only on
    the data, the level and the window. Long-distance matching is off: it finds matches
    only inside the window, which the device's memory keeps at a few MiB.
    """

    def __init__(
        self,
        level: int,
        stream: StreamParameters,
        chunk_size: int,
        content_key: bytes | None,
    ) -> None:
        self._parameters = zstandard.ZstdCompressionParameters.from_level(
            level,
            window_log=stream.window_log,
            write_content_size=True,
            write_checksum=False,
            write_dict_id=False,
            threads=0,
        )
        self._chunk_size = chunk_size
        self._content_key = content_key

    def encode(self, source: ImageSource, first: int, sizes: Sequence[int]) -> list[_EncodedChunk]:
        compressor = zstandard.ZstdCompressor(compression_params=self._parameters)
        encoder = compressor.compressobj(size=sum(sizes))
        chunks: list[_EncodedChunk] = []
        try:
            with source.path.open("rb") as handle:
                handle.seek(first * self._chunk_size)
                for number, data_size in enumerate(sizes):
                    data = handle.read(data_size)
                    if len(data) != data_size:
                        raise BundleError(
                            f"image {source.name}: {source.path} shrank while it was read"
                        )
                    last = number == len(sizes) - 1
                    stored = encoder.compress(data) + encoder.flush(
                        zstandard.COMPRESSOBJ_FLUSH_FINISH
                        if last
                        else zstandard.COMPRESSOBJ_FLUSH_BLOCK
                    )
                    if self._content_key is not None:
                        stored = crypt.encrypt_chunk(
                            self._content_key, source.name, first + number, stored
                        )
                    chunks.append(
                        _EncodedChunk(
                            stored,
                            hashlib.sha256(stored).hexdigest(),
                            hashlib.sha256(data).hexdigest(),
                            data_size,
                        )
                    )
        except OSError as error:
            raise BundleError(
                f"image {source.name}: cannot read {source.path}: {error.strerror or error}"
            ) from None
        return chunks


class _StreamWriter:
    """Appends zstd-stream images to the payload frame by frame, at most `window` frames in
    flight. Each worker reads its frame from the image file itself and keeps only the
    compressed bytes, so memory is a few frames' compressed size plus the zstd contexts; the
    image hash is computed here, by one more sequential read (from the page cache)."""

    def __init__(
        self,
        payload: BinaryIO,
        pool: ThreadPoolExecutor,
        window: int,
        frames: _FrameEncoder,
        chunk_size: int,
        stream: StreamParameters,
    ) -> None:
        self._payload = payload
        self._pool = pool
        self._window = window
        self._frames = frames
        self._chunk_size = chunk_size
        self._stream = stream
        self.done = 0

    def add_image(
        self, source: ImageSource, size: int, report: Callable[[int], None]
    ) -> ImageEntry:
        count = chunk_count(size, self._chunk_size)
        sizes = [min(self._chunk_size, size - index * self._chunk_size) for index in range(count)]
        step = self._stream.frame_chunks
        chunks: list[ChunkEntry] = []
        pending: deque[Future[list[_EncodedChunk]]] = deque()
        image_hash = hashlib.sha256()
        hashed = _read_chunks(source, size, self._chunk_size)

        def store_oldest() -> None:
            for encoded in pending.popleft().result():
                image_hash.update(next(hashed))
                self._payload.write(encoded.stored)
                chunks.append(
                    ChunkEntry(
                        len(chunks), len(encoded.stored), encoded.sha256, encoded.data_sha256
                    )
                )
                self.done += encoded.data_size
                report(self.done)

        try:
            for first in range(0, count, step):
                frame_sizes = sizes[first : first + step]
                pending.append(self._pool.submit(self._frames.encode, source, first, frame_sizes))
                if len(pending) >= self._window:
                    store_oldest()
            while pending:
                store_oldest()
            for _ in hashed:  # the check that the file did not grow
                pass
        finally:
            for future in pending:
                future.cancel()
        return ImageEntry(source.name, size, image_hash.hexdigest(), tuple(chunks))


def _read_chunks(source: ImageSource, size: int, chunk_size: int) -> Iterator[bytes]:
    try:
        with source.path.open("rb") as handle:
            remaining = size
            while remaining:
                wanted = min(chunk_size, remaining)
                data = handle.read(wanted)
                if len(data) != wanted:
                    raise BundleError(
                        f"image {source.name}: {source.path} shrank while it was read"
                    )
                remaining -= wanted
                yield data
            if handle.read(1):
                raise BundleError(f"image {source.name}: {source.path} grew while it was read")
    except OSError as error:
        raise BundleError(
            f"image {source.name}: cannot read {source.path}: {error.strerror or error}"
        ) from None


def _assemble(output: Path, head: Sequence[bytes], payload: BinaryIO) -> None:
    """Write head + payload to a temporary name beside `output`, then rename it into place."""
    temporary = output.parent / f".{output.name}.{secrets.token_hex(6)}.tmp"
    try:
        with temporary.open("xb") as handle:
            for part in head:
                handle.write(part)
            _copy_payload(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _copy_payload(payload: BinaryIO, handle: BinaryIO) -> None:
    payload.flush()
    size = payload.seek(0, os.SEEK_END)
    handle.flush()
    copied = 0
    try:
        # In-kernel copy (a reflink on filesystems that share extents); it moves the
        # destination's file offset itself, which `handle` has just been flushed to.
        while copied < size:
            count = os.copy_file_range(
                payload.fileno(), handle.fileno(), size - copied, offset_src=copied
            )
            if count == 0:
                break
            copied += count
    except OSError:
        pass
    payload.seek(copied)
    handle.seek(0, os.SEEK_END)
    shutil.copyfileobj(payload, handle, _COPY_BLOCK)
