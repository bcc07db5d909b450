"""Reading an `.avb` bundle: strictly sequential, bounded memory (docs/bundle-format.md, 6).

The layout is built for a reader that sees the bundle once, as a stream: a fixed 34-byte
header gives the sizes of the two text regions, the signature over the manifest is checked
before the manifest is parsed, and the payload is a plain sequence of independent zstd
frames whose stored bytes are hashed in the signed manifest, so every chunk is authenticated
before it is decompressed or written anywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, cast

import zstandard

from avobuild.bundle import crypt
from avobuild.bundle.crypt import DecryptionKey
from avobuild.bundle.header import HEADER_SIZE, MAGIC, BundleHeader, parse_header
from avobuild.bundle.keys import Keyring
from avobuild.bundle.manifest import (
    ChunkEntry,
    Compression,
    ImageEntry,
    Manifest,
    StreamParameters,
    parse_manifest,
)
from avobuild.bundle.sign import (
    SignatureBlock,
    VerifiedSigner,
    parse_signature_block,
)
from avobuild.bundle.verify import verify_all_signatures
from avobuild.errors import BundleError


def decode_chunk(
    stored: bytes,
    data_size: int,
    compression: Compression,
    decompressor: zstandard.ZstdDecompressor,
) -> bytes:
    """Decompress one chunk's stored bytes, refusing anything but exactly `data_size` bytes."""
    if compression is Compression.NONE:
        if len(stored) != data_size:
            raise BundleError(f"holds {len(stored)} bytes, expected {data_size}")
        return stored
    return decode_frame(stored, data_size, decompressor)


# The magic number that starts a zstd frame (RFC 8878, 3.1.1), as it is stored.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def decode_frame(stored: bytes, data_size: int, decompressor: zstandard.ZstdDecompressor) -> bytes:
    """Exactly one zstd frame declaring `data_size` bytes, decoded: a skippable frame, a second
    frame or any byte after the frame is refused (bundle chunks and delta payloads alike).
    Errors are phrased to follow the name of what was decoded ("chunk 3 …: is not …")."""
    if not stored.startswith(ZSTD_MAGIC):
        raise BundleError("is not a zstd frame (it does not start with the frame magic number)")
    try:
        declared = zstandard.get_frame_parameters(stored).content_size
    except zstandard.ZstdError as error:
        raise BundleError(f"is not a zstd frame: {error}") from None
    # The declared size is checked first: the decompressor trusts it for its allocation.
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        raise BundleError("is a zstd frame without a content size in its header")
    if declared != data_size:
        raise BundleError(f"is a zstd frame of {declared} bytes, expected {data_size}")
    check_zstd_frame(stored)
    try:
        data = decompressor.decompress(stored, max_output_size=data_size, allow_extra_data=False)
    except zstandard.ZstdError as error:
        raise BundleError(f"cannot be decompressed: {error}") from None
    if len(data) != data_size:
        raise BundleError(f"decompresses to {len(data)} bytes, expected {data_size}")
    return data


_MAX_BLOCK = 128 << 10


def check_stream_frame_header(stored: bytes, frame_size: int, stream: StreamParameters) -> None:
    """The start of a zstd-stream frame (its first chunk's stored bytes): a zstd frame header
    declaring `frame_size` bytes of content, no dictionary, a window within the manifest's
    (docs/bundle-format.md 5.2). Checked before the decoder sees a byte, as the zstd command's
    --memory limit does on the device."""
    if not stored.startswith(ZSTD_MAGIC) or len(stored) < 6:
        raise BundleError("does not start a zstd frame (no frame magic number)")
    if stored[4] & 0x08:
        raise BundleError("starts a zstd frame with the reserved header bit set")
    try:
        header = zstandard.get_frame_parameters(stored)
    except zstandard.ZstdError as error:
        raise BundleError(f"does not start a zstd frame: {error}") from None
    if header.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise BundleError("starts a zstd frame without a content size in its header")
    if header.content_size != frame_size:
        raise BundleError(
            f"starts a zstd frame of {header.content_size} bytes, expected {frame_size}"
        )
    if header.dict_id != 0 or stored[4] & 0x03:
        raise BundleError("starts a zstd frame that names a dictionary")
    if header.window_size > stream.window_size:
        raise BundleError(
            f"starts a zstd frame with a {header.window_size}-byte window, over the "
            f"manifest's 2^{stream.window_log}"
        )


class _FrameEnd:
    """Walks the block headers of a zstd frame fed piece by piece (RFC 8878, 3.1.1.2), to
    find where the frame ends without decoding it: the frame must end exactly with its last
    chunk (no skippable frame, no byte after it), and every block must stay within the block
    size limit the zstd command enforces (see check_zstd_frame)."""

    def __init__(self, first: bytes, window_size: int) -> None:
        descriptor = first[4]
        single_segment = descriptor & 0x20
        self._skip = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
        self._skip += (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
        self._checksum = 4 if descriptor & 0x04 else 0
        self._largest = min(window_size, _MAX_BLOCK)
        self._header = b""
        self._last_seen = False
        self.ended = False

    def feed(self, data: bytes) -> None:
        position = 0
        while position < len(data):
            if self.ended:
                raise BundleError("holds bytes after the end of its zstd frame")
            if self._skip:
                step = min(self._skip, len(data) - position)
                position += step
                self._skip -= step
                self.ended = self._last_seen and not self._skip
                continue
            piece = data[position : position + 3 - len(self._header)]
            self._header += piece
            position += len(piece)
            if len(self._header) < 3:
                return
            header = int.from_bytes(self._header, "little")
            self._header = b""
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3 or size > self._largest:
                raise BundleError("holds an invalid zstd block header")
            self._skip = (1 if kind == 1 else size) + (self._checksum if last else 0)
            self._last_seen = bool(last)
            self.ended = self._last_seen and not self._skip


def check_zstd_frame(stored: bytes) -> None:
    """`stored` is one zstd frame (RFC 8878, 3.1.1) and nothing else, each of its blocks within
    the format's block size limit (3.1.1.2.4: min(Window_Size, 128 KiB)). libzstd's one-shot
    decoder accepts a raw block past that limit, its streaming decoder (the zstd command a
    device runs) refuses it, so the reader walks the block headers itself."""
    if not stored.startswith(ZSTD_MAGIC) or len(stored) < 6:
        raise BundleError("is not a zstd frame (no frame magic number)")
    descriptor = stored[4]
    single_segment = descriptor & 0x20
    if descriptor & 0x08:
        raise BundleError("is a zstd frame with the reserved header bit set")
    position = 5
    window = 0
    if not single_segment:
        exponent, mantissa = stored[5] >> 3, stored[5] & 7
        base = 1 << (10 + exponent)
        window = base + base // 8 * mantissa
        position += 1
    position += (0, 1, 2, 4)[descriptor & 3]
    size_bytes = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    content = int.from_bytes(stored[position : position + size_bytes], "little")
    if size_bytes == 2:
        content += 256
    position += size_bytes
    largest = min(content if single_segment else window, _MAX_BLOCK)
    last = 0
    while not last:
        if position + 3 > len(stored):
            raise BundleError("is a truncated zstd frame")
        header = int.from_bytes(stored[position : position + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3 or size > largest:
            raise BundleError(f"is a zstd frame with an invalid block at byte {position}")
        position += 3 + (1 if kind == 1 else size)
    position += 4 if descriptor & 0x04 else 0
    if position != len(stored):
        raise BundleError(
            "is not exactly one zstd frame (a second or skippable frame, or bytes after it)"
        )


@dataclass(frozen=True)
class ResumedPrefix:
    """The first `chunks` chunks of an image (whole zstd-stream frames), already written to a
    slot and read back there against their signed data hashes by the installer that resumes;
    `image_hash` has hashed exactly their data."""

    chunks: int
    image_hash: hashlib._Hash


def _located(name: str, error: BundleError) -> BundleError:
    """The same error family, its message prefixed with the bundle's name."""
    return type(error)(f"{name}: {error}")


class BundleReader:
    """Reads a bundle strictly sequentially from a file or a pipe.

    Opening reads the header, the manifest bytes and the signature block (bounded by the
    format's limits). The manifest is parsed only by `verify_signature`, so no unverified
    byte ever reaches a decision; `unverified_manifest` exists for `bundle info` and says so.
    The payload of a seekable file may be read several times; that of a pipe only once.
    """

    def __init__(self, stream: BinaryIO, name: str, *, owns_stream: bool) -> None:
        self.name = name
        self._stream = stream
        self._owns_stream = owns_stream
        self._start = _tell(stream)
        self._position = 0
        self._payload_read = False
        self._manifest: Manifest | None = None
        self._signer: VerifiedSigner | None = None
        self.signers: tuple[VerifiedSigner, ...] = ()
        self._content_key: bytes | None = None
        self.signature_bytes = b""
        self.header = self._read_header()
        self.manifest_bytes = self._read_exact(self.header.manifest_size, "the manifest")
        signature_bytes = self._read_exact(self.header.signature_block_size, "the signature block")
        self.signature_bytes = signature_bytes
        try:
            self.signature_block: SignatureBlock = parse_signature_block(signature_bytes)
        except BundleError as error:
            raise _located(name, error) from None

    @classmethod
    def open(cls, path: Path) -> BundleReader:
        try:
            stream = path.open("rb")
        except OSError as error:
            raise BundleError(f"{path}: cannot open bundle: {error.strerror or error}") from None
        try:
            return cls(stream, str(path), owns_stream=True)
        except BaseException:
            stream.close()
            raise

    @classmethod
    def from_stream(cls, stream: BinaryIO, name: str = "<stdin>") -> BundleReader:
        """Read from an open stream (not closed by the reader), starting at its position."""
        return cls(stream, name, owns_stream=False)

    def close(self) -> None:
        if self._owns_stream:
            self._stream.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def payload_offset(self) -> int:
        return self.header.payload_offset

    @property
    def signature_verified(self) -> bool:
        return self._signer is not None

    @property
    def signer(self) -> VerifiedSigner | None:
        return self._signer

    def verify_signature(self, keyring: Keyring, *, now: int | None = None) -> VerifiedSigner:
        """Check the signatures over the manifest bytes, then parse the verified manifest.

        `now` (seconds since 1970, default the clock) is when certificates must be valid,
        unless the keyring judges them at signing time. All trusted signers that verified are
        in `signers` afterwards; the first is returned.
        """
        try:
            signers = verify_all_signatures(
                self.manifest_bytes,
                self.signature_block,
                keyring,
                now=now,
                signing_time=lambda: parse_manifest(self.manifest_bytes).build_date,
            )
            manifest = parse_manifest(self.manifest_bytes)
        except BundleError as error:
            raise _located(self.name, error) from None
        self._manifest = manifest
        self._signer = signers[0]
        self.signers = signers
        return signers[0]

    def unlock(self, key: DecryptionKey | None) -> None:
        """Give the key of an encrypted payload: a recipient's private key, or the content key
        itself (`crypt.load_decryption_key` reads either from a file). None does nothing.

        Only after `verify_signature`: the key is checked against the signed commitment.
        """
        encryption = self.manifest.encryption
        if encryption is None or key is None:
            return
        if isinstance(key, bytes):
            content_key = key
        else:
            content_key = crypt.content_key_for(
                self.signature_block.extra_lines, key, encryption.key_commitment, self.name
            )
        if crypt.key_commitment(content_key) != encryption.key_commitment:
            raise BundleError(
                f"{self.name}: the decryption key is not the one the signed manifest commits to"
            )
        self._content_key = content_key

    @property
    def manifest(self) -> Manifest:
        """The signature-verified manifest; BundleError before `verify_signature` succeeded."""
        if self._manifest is None:
            raise BundleError(
                f"{self.name}: the manifest is not available before its signature is verified"
            )
        return self._manifest

    def unverified_manifest(self) -> Manifest:
        """The manifest parsed WITHOUT checking its signature: for display only."""
        try:
            return parse_manifest(self.manifest_bytes)
        except BundleError as error:
            raise _located(self.name, error) from None

    def iter_chunks(self) -> Iterator[tuple[ImageEntry, ChunkEntry, bytes]]:
        """Yield every chunk's decompressed data in payload order, each checked first.

        A chunk is yielded only after its stored bytes matched their signed hash and it
        decompressed to exactly its size. The last chunk of an image is yielded only after the
        image's own hash matched, and the last chunk of the bundle only after the end of the
        payload was confirmed, so a consumer that sees the iteration finish without an error
        has received exactly the signed images.
        """
        manifest = self.manifest
        if manifest.encryption is not None and self._content_key is None:
            raise BundleError(
                f"{self.name}: the payload is encrypted; give a decryption key (a recipient's "
                "private key or the key file)"
            )
        return self._chunks(manifest)

    def iter_chunks_resuming(
        self, prefixes: Mapping[str, ResumedPrefix]
    ) -> Iterator[tuple[ImageEntry, ChunkEntry, bytes | None]]:
        """`iter_chunks` for an install that resumes (zstd-stream only): the chunks of each
        image's prefix (`prefixes`, whole frames, already in the slot and checked there against
        their signed data hashes) are read and checked against their stored hashes but not
        decoded, and yielded with None for their data; the image hash starts from the
        prefix's. Every other guarantee of `iter_chunks` holds."""
        manifest = self.manifest
        stream = manifest.stream
        if stream is None:
            raise BundleError(f"{self.name}: only a zstd-stream payload resumes frame by frame")
        for image in manifest.images:
            prefix = prefixes.get(image.name)
            if prefix is not None and not (
                0 <= prefix.chunks <= image.chunk_count
                and (prefix.chunks % stream.frame_chunks == 0 or prefix.chunks == image.chunk_count)
            ):
                raise BundleError(
                    f"{self.name}: image {image.name}: cannot resume at chunk {prefix.chunks} "
                    "(not the start of a frame)"
                )
        if manifest.encryption is not None and self._content_key is None:
            raise BundleError(f"{self.name}: the payload is encrypted; give a decryption key")
        self._start_payload()
        return self._streamed_chunks(manifest, stream, self._final(manifest), prefixes)

    def iter_unverified_chunks(self) -> Iterator[tuple[ImageEntry, ChunkEntry, bytes]]:
        """The chunks of the manifest parsed WITHOUT checking its signature, each checked
        against it exactly as `iter_chunks` does: for measuring (`delta stats`), never for
        installing."""
        manifest = self.unverified_manifest()
        if manifest.encryption is not None:
            raise BundleError(
                f"{self.name}: the payload is encrypted; give --keyring and a decryption key"
            )
        return self._chunks(manifest)

    def _final(self, manifest: Manifest) -> tuple[str, int] | None:
        """The last chunk of the payload; with no chunk at all, the end is checked now."""
        chunked = [image for image in manifest.images if image.chunks]
        final = (chunked[-1].name, chunked[-1].chunk_count - 1) if chunked else None
        if final is None:
            self._check_end()
        return final

    def _chunks(self, manifest: Manifest) -> Iterator[tuple[ImageEntry, ChunkEntry, bytes]]:
        self._start_payload()
        final = self._final(manifest)
        if manifest.stream is not None:
            for image, chunk, data in self._streamed_chunks(manifest, manifest.stream, final, {}):
                assert data is not None  # no prefix is skipped
                yield image, chunk, data
            return
        decompressor = zstandard.ZstdDecompressor()
        for image in manifest.images:
            image_hash = hashlib.sha256()
            for chunk in image.chunks:
                offset = self._position
                what = f"chunk {chunk.index} of image {image.name}"
                stored = self._read_exact(chunk.stored_size, what)
                where = f"{self.name}: {what} at byte offset {offset}"
                digest = hashlib.sha256(stored).hexdigest()
                if digest != chunk.sha256:
                    raise BundleError(
                        f"{where}: sha256 mismatch (expected {chunk.sha256}, got {digest}); "
                        "the bundle is corrupt or was modified"
                    )
                data_size = manifest.chunk_data_size(image, chunk.index)
                try:
                    if self._content_key is not None:
                        stored = crypt.decrypt_chunk(
                            self._content_key, image.name, chunk.index, stored
                        )
                    data = decode_chunk(stored, data_size, manifest.compression, decompressor)
                except BundleError as error:
                    raise BundleError(f"{where}: {error}") from None
                image_hash.update(data)
                if chunk.index == image.chunk_count - 1:
                    self._check_image(image, image_hash.hexdigest())
                    if (image.name, chunk.index) == final:
                        self._check_end()
                yield image, chunk, data

    def _verified_stored(self, manifest: Manifest, image: ImageEntry, chunk: ChunkEntry) -> bytes:
        """The next chunk's stored bytes, hashed against the manifest and decrypted."""
        offset = self._position
        what = f"chunk {chunk.index} of image {image.name}"
        stored = self._read_exact(chunk.stored_size, what)
        digest = hashlib.sha256(stored).hexdigest()
        if digest != chunk.sha256:
            raise BundleError(
                f"{self.name}: {what} at byte offset {offset}: sha256 mismatch (expected "
                f"{chunk.sha256}, got {digest}); the bundle is corrupt or was modified"
            )
        if self._content_key is not None:
            try:
                stored = crypt.decrypt_chunk(self._content_key, image.name, chunk.index, stored)
            except BundleError as error:
                raise BundleError(f"{self.name}: {what} at byte offset {offset}: {error}") from None
        return stored

    def _streamed_chunks(
        self,
        manifest: Manifest,
        stream: StreamParameters,
        final: tuple[str, int] | None,
        prefixes: Mapping[str, ResumedPrefix],
    ) -> Iterator[tuple[ImageEntry, ChunkEntry, bytes | None]]:
        """zstd-stream (docs/bundle-format.md 5.2): one decoder per frame, fed only stored
        bytes whose hash matched; each chunk's decoded data is checked against its own hash
        before it is yielded. The frames of a resumed prefix are only hashed (None)."""
        for image in manifest.images:
            prefix = prefixes.get(image.name)
            image_hash = prefix.image_hash.copy() if prefix is not None else hashlib.sha256()
            skip = prefix.chunks if prefix is not None else 0
            for frame in manifest.frames(image):
                if frame[-1].index < skip:
                    for chunk in frame:
                        self._verified_stored(manifest, image, chunk)
                        if chunk.index == image.chunk_count - 1:
                            self._check_image(image, image_hash.hexdigest())
                            if (image.name, chunk.index) == final:
                                self._check_end()
                        yield image, chunk, None
                    continue
                sizes = [manifest.chunk_data_size(image, chunk.index) for chunk in frame]
                first = self._verified_stored(manifest, image, frame[0])
                try:
                    check_stream_frame_header(first, sum(sizes), stream)
                except BundleError as error:
                    raise BundleError(
                        f"{self.name}: chunk {frame[0].index} of image {image.name}: {error}"
                    ) from None
                source = _VerifiedFrame(self, manifest, image, frame, first)
                decoder = zstandard.ZstdDecompressor(
                    max_window_size=stream.window_size
                ).stream_reader(
                    # The decoder only calls read() on its source.
                    cast(BinaryIO, source),
                    read_across_frames=False,
                    closefd=False,
                )
                for chunk, data_size in zip(frame, sizes, strict=True):
                    what = f"{self.name}: chunk {chunk.index} of image {image.name}"
                    data = _read_decoded(decoder, data_size, what)
                    digest = hashlib.sha256(data).hexdigest()
                    if digest != chunk.data_sha256:
                        raise BundleError(
                            f"{what}: the decompressed data's sha256 is {digest}, the manifest "
                            f"says {chunk.data_sha256}"
                        )
                    image_hash.update(data)
                    last_of_frame = chunk is frame[-1]
                    if last_of_frame and (
                        _read_decoded(decoder, 1, what, exact=False) or not source.exhausted
                    ):
                        raise BundleError(
                            f"{what}: its frame does not end with the chunk's stored bytes"
                        )
                    if chunk.index == image.chunk_count - 1:
                        self._check_image(image, image_hash.hexdigest())
                        if (image.name, chunk.index) == final:
                            self._check_end()
                    yield image, chunk, data

    def verify_payload(self) -> None:
        """Read and check every chunk and every image hash; write nothing."""
        for _ in self.iter_chunks():
            pass

    def _check_image(self, image: ImageEntry, digest: str) -> None:
        if digest != image.sha256:
            raise BundleError(
                f"{self.name}: image {image.name}: sha256 of the decompressed image is {digest}, "
                f"the manifest says {image.sha256}"
            )

    def _start_payload(self) -> None:
        if self._payload_read:
            if self._start is None:
                raise BundleError(
                    f"{self.name}: the payload of a stream can be read only once; "
                    "iterate over the chunks once and consume them as they come"
                )
            try:
                self._stream.seek(self._start + self.payload_offset)
            except (OSError, ValueError) as error:
                raise BundleError(f"{self.name}: cannot seek to the payload: {error}") from None
            self._position = self.payload_offset
        self._payload_read = True

    def _check_end(self) -> None:
        if self._read_some(1):
            raise BundleError(
                f"{self.name}: unexpected data at byte offset {self._position - 1}, after the "
                "last chunk; the bundle is corrupt or was modified"
            )

    def _read_header(self) -> BundleHeader:
        data = self._read_some(HEADER_SIZE)
        if len(data) < HEADER_SIZE and (MAGIC + b" ").startswith(data[:10]):
            raise BundleError(
                f"{self.name}: truncated at byte offset {len(data)}: expected "
                f"{HEADER_SIZE - len(data)} more bytes of the header"
            )
        try:
            return parse_header(data)
        except BundleError as error:
            raise _located(self.name, error) from None

    def _read_exact(self, size: int, what: str) -> bytes:
        data = self._read_some(size)
        if len(data) < size:
            raise BundleError(
                f"{self.name}: truncated at byte offset {self._position}: expected "
                f"{size - len(data)} more bytes of {what}"
            )
        return data

    def _read_some(self, size: int) -> bytes:
        """Up to `size` bytes: fewer only at the end of the stream."""
        parts: list[bytes] = []
        remaining = size
        try:
            while remaining:
                part = self._stream.read(remaining)
                if not part:
                    break
                parts.append(part)
                remaining -= len(part)
        except (OSError, ValueError) as error:
            raise BundleError(
                f"{self.name}: read error at byte offset {self._position}: {error}"
            ) from None
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._position += len(data)
        return data


class _VerifiedFrame:
    """The stored bytes of one zstd-stream frame as a file for the decoder to read: each chunk
    is read from the bundle and checked against its hash only when the decoder asks for more,
    so the decoder never sees a byte that was not authenticated."""

    def __init__(
        self,
        reader: BundleReader,
        manifest: Manifest,
        image: ImageEntry,
        frame: tuple[ChunkEntry, ...],
        first: bytes,
    ) -> None:
        self._reader = reader
        self._manifest = manifest
        self._image = image
        self._pending = list(frame[1:])
        self._buffer = memoryview(first)
        self._end = _FrameEnd(first, zstandard.get_frame_parameters(first).window_size)
        self._feed(frame[0], first)

    def _feed(self, chunk: ChunkEntry, stored: bytes) -> None:
        try:
            self._end.feed(stored)
            if not self._pending and not self._end.ended:
                raise BundleError("ends before its zstd frame does")
        except BundleError as error:
            raise BundleError(
                f"{self._reader.name}: chunk {chunk.index} of image {self._image.name}: {error}"
            ) from None

    @property
    def exhausted(self) -> bool:
        return not self._buffer and not self._pending

    def read(self, size: int = -1) -> bytes:
        while not self._buffer and self._pending:
            chunk = self._pending.pop(0)
            stored = self._reader._verified_stored(self._manifest, self._image, chunk)
            self._feed(chunk, stored)
            self._buffer = memoryview(stored)
        if size < 0:
            size = len(self._buffer)
        data = bytes(self._buffer[:size])
        self._buffer = self._buffer[size:]
        return data


def _read_decoded(
    decoder: zstandard.ZstdDecompressionReader, size: int, what: str, *, exact: bool = True
) -> bytes:
    parts: list[bytes] = []
    remaining = size
    try:
        while remaining:
            part = decoder.read(remaining)
            if not part:
                break
            parts.append(part)
            remaining -= len(part)
    except zstandard.ZstdError as error:
        raise BundleError(f"{what}: cannot be decompressed: {error}") from None
    data = b"".join(parts)
    if exact and len(data) != size:
        raise BundleError(f"{what}: its frame ends {size - len(data)} bytes before the chunk's end")
    return data


def _tell(stream: BinaryIO) -> int | None:
    """The stream's position if it can seek back to it later, else None (a pipe)."""
    try:
        return stream.tell() if stream.seekable() else None
    except (OSError, ValueError):
        return None
