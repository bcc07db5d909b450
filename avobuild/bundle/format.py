"""The `.avb` container: header, manifest, signature block, payload (docs/bundle-format.md).

The layout is built for a reader that sees the bundle once, as a stream, in bounded memory:
a fixed 34-byte header gives the sizes of the two text regions, the signature over the
manifest is checked before the manifest is parsed, and the payload is a plain sequence of
independent zstd frames whose stored bytes are hashed in the signed manifest, so every chunk
is authenticated before it is decompressed or written anywhere.

`write_bundle` streams each image chunk by chunk, compressing a bounded window of chunks in
parallel (zstandard releases the GIL) while keeping their order, so memory stays at a few
chunks whatever the image size, and the same inputs always give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import zstandard

from avobuild.bundle import crypt
from avobuild.bundle.keys import Keyring, PrivateKey, PublicKey
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
    check_build_date,
    check_chunk_size,
    check_compatible,
    check_identifier,
    check_image_name,
    check_policy,
    chunk_count,
    max_stored_size,
    parse_manifest,
    render_manifest,
)
from avobuild.bundle.sign import (
    MAX_SIGNATURE_BLOCK_SIZE,
    CertificateEntry,
    KeySigner,
    SignatureBlock,
    Signer,
    VerifiedSigner,
    parse_signature_block,
    render_signature_block,
    sign_manifest_with,
)
from avobuild.bundle.verify import verify_all_signatures
from avobuild.errors import BundleError

MAGIC = b"AVOBUNDLE"
FORMAT_VERSION = 1
HEADER_SIZE = 34
DEFAULT_LEVEL = 10
_HEADER = re.compile(rb"AVOBUNDLE ([0-9]) ([0-9]{10}) ([0-9]{10})\n")
_COPY_BLOCK = 1 << 20

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BundleHeader:
    format_version: int
    manifest_size: int
    signature_block_size: int

    @property
    def payload_offset(self) -> int:
        return HEADER_SIZE + self.manifest_size + self.signature_block_size


def render_header(manifest_size: int, signature_block_size: int) -> bytes:
    return b"AVOBUNDLE %d %010d %010d\n" % (FORMAT_VERSION, manifest_size, signature_block_size)


def parse_header(data: bytes) -> BundleHeader:
    """Parse the 34-byte header and check the region sizes against the limits."""
    if not data.startswith(MAGIC + b" "):
        raise BundleError(
            f"not an avobuild bundle: it starts with {data[:10]!r}, expected b'AVOBUNDLE '"
        )
    version = data[10:11]
    if version != b"%d" % FORMAT_VERSION:
        raise BundleError(
            f"unsupported bundle format version {version.decode('ascii', 'replace')!r} "
            f"(this avobuild reads version {FORMAT_VERSION}; a newer avobuild is needed)"
        )
    match = _HEADER.fullmatch(data)
    if match is None:
        raise BundleError(
            f"malformed header {data!r}: expected 'AVOBUNDLE 1 ' then the manifest size and the "
            "signature block size as 10 decimal digits each, separated by a space, then a newline"
        )
    manifest_size = int(match.group(2))
    signature_block_size = int(match.group(3))
    if not 1 <= manifest_size <= MAX_MANIFEST_SIZE:
        raise BundleError(
            f"header: manifest size {manifest_size} is out of bounds (1 to {MAX_MANIFEST_SIZE})"
        )
    if not 1 <= signature_block_size <= MAX_SIGNATURE_BLOCK_SIZE:
        raise BundleError(
            f"header: signature block size {signature_block_size} is out of bounds "
            f"(1 to {MAX_SIGNATURE_BLOCK_SIZE})"
        )
    return BundleHeader(FORMAT_VERSION, manifest_size, signature_block_size)


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


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_BLOCK = 128 << 10


def check_zstd_frame(stored: bytes) -> None:
    """`stored` is one zstd frame (RFC 8878, 3.1.1) and nothing else, each of its blocks within
    the format's block size limit (3.1.1.2.4: min(Window_Size, 128 KiB)). libzstd's one-shot
    decoder accepts a raw block past that limit, its streaming decoder (the zstd command a
    device runs) refuses it, so the reader walks the block headers itself."""
    if not stored.startswith(_ZSTD_MAGIC) or len(stored) < 6:
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

    def unlock(
        self, *, private_key: PrivateKey | None = None, content_key: bytes | None = None
    ) -> None:
        """Give the key of an encrypted payload: a recipient's private key, or the key itself.

        Only after `verify_signature`: the key is checked against the signed commitment.
        """
        encryption = self.manifest.encryption
        if encryption is None:
            return
        if private_key is not None:
            content_key = crypt.content_key_for(
                self.signature_block.extra_lines,
                private_key,
                encryption.key_commitment,
                self.name,
            )
        if content_key is None or crypt.key_commitment(content_key) != encryption.key_commitment:
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
        self._start_payload()
        chunked = [image for image in manifest.images if image.chunks]
        final = (chunked[-1].name, chunked[-1].chunk_count - 1) if chunked else None
        if final is None:
            self._check_end()
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


def _tell(stream: BinaryIO) -> int | None:
    """The stream's position if it can seek back to it later, else None (a pipe)."""
    try:
        return stream.tell() if stream.seekable() else None
    except (OSError, ValueError):
        return None


def bundle_info(reader: BundleReader) -> dict[str, object]:
    """A JSON-able description of the bundle; the manifest is verified only if the reader was."""
    manifest = reader.manifest if reader.signature_verified else reader.unverified_manifest()
    signer = reader.signer
    return {
        "file": reader.name,
        "format": reader.header.format_version,
        "type": manifest.type.value,
        "name": manifest.name,
        "version": manifest.version,
        "compatible": manifest.compatible,
        "build_date": manifest.build_date,
        "manifest_version": manifest.manifest_version,
        "security_version": manifest.policy.security_version,
        "min_applier_version": manifest.policy.min_applier_version,
        "expires": manifest.policy.expires,
        "encryption": manifest.encryption.algorithm if manifest.encryption else None,
        "chunk_size": manifest.chunk_size,
        "compression": manifest.compression.value,
        "images": [
            {
                "name": image.name,
                "size": image.size,
                "sha256": image.sha256,
                "chunks": image.chunk_count,
                "stored_size": image.stored_size,
                **(
                    {
                        "source": {"size": image.source.size, "sha256": image.source.sha256},
                        "target": {"size": image.target.size, "sha256": image.target.sha256},
                    }
                    if image.source is not None and image.target is not None
                    else {}
                ),
            }
            for image in manifest.images
        ],
        "signatures": [
            {"algorithm": entry.algorithm, "key_id": entry.key_id, "supported": entry.supported}
            for entry in reader.signature_block.signatures
        ],
        "certificates": [entry.key_id for entry in reader.signature_block.certificates],
        "signature_verified": signer is not None,
        "signer": signer.key_id if signer is not None else None,
        "signers": [verified.key_id for verified in reader.signers],
        "manifest_size": reader.header.manifest_size,
        "signature_block_size": reader.header.signature_block_size,
        "payload_offset": reader.payload_offset,
        "payload_size": manifest.payload_size,
        "total_size": reader.payload_offset + manifest.payload_size,
    }


# --- writing ---------------------------------------------------------------------------------


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
) -> Manifest:
    """Write a signed bundle of `images` to `output` atomically; return its manifest.

    The manifest is signed by `private_key` and every one of `signers` (an HSM key, a second
    key); `certificates` go into the signature block. `unsigned=True` writes a bundle with an
    empty signature block, to be signed offline (docs/signing.md). `policy` adds the
    installation policy lines (manifest version 2). `encryption_key` (32 bytes) or
    `recipients` (RSA/EC public keys; a random key is made for them) encrypt the payload
    (avobuild/bundle/crypt.py). `threads` defaults to the number of CPUs;
    `progress(done, total)` counts image bytes.
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
    if compression is Compression.ZSTD and not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
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
