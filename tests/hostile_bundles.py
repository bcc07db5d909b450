"""A seeded corpus of hostile bundles and deltas for tests/test_differential.py.

Bundles are assembled here from their parts, not by avobuild's writer, so that every part can
break the format: the header, the manifest lines, the signature block, the payload framing and
the delta stream's operations. A case whose manifest changed is signed again with the trusted
key, so the reader has to find the fault itself rather than stop at the signature. Each line
mutation is applied to a line at the start, in the middle and at the end of its region.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import itertools
import lzma
import random
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import bsdiff4
import zstandard
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

CHUNK = 65536
BUILD_DATE = "1767225600"
SKIPPABLE = b"\x50\x2a\x4d\x18\x04\x00\x00\x00skip"
P256_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_id_of(public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return sha(der)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Signer:
    algorithm: str
    key_id: str
    sign: Callable[[bytes], bytes]

    def line(self, manifest: bytes) -> str:
        return f"signature {self.algorithm} {self.key_id} {b64(self.sign(manifest))}"


def ed25519_signer(private: ed25519.Ed25519PrivateKey) -> Signer:
    return Signer("ed25519", key_id_of(private.public_key()), private.sign)


def ecdsa_signer(private: ec.EllipticCurvePrivateKey, *, high_s: bool = False) -> Signer:
    """P-256 signatures in the low-s spelling (or the high-s one, which is refused)."""

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(private.sign(data, ec.ECDSA(hashes.SHA256())))
        low = min(s, P256_ORDER - s)
        return encode_dss_signature(r, P256_ORDER - low if high_s else low)

    return Signer("ecdsa-p256-sha256", key_id_of(private.public_key()), sign)


# --- zstd frames --------------------------------------------------------------------------------


def frame(data: bytes, *, content_size: bool = True, checksum: bool = False) -> bytes:
    compressor = zstandard.ZstdCompressor(
        level=3, write_content_size=content_size, write_checksum=checksum
    )
    return compressor.compress(data)


def patch_frame(data: bytes, window: bytes) -> bytes:
    """A frame decoded with `window` as raw-content dictionary (`zstd --patch-from`)."""
    dictionary = zstandard.ZstdCompressionDict(window, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    compressor = zstandard.ZstdCompressor(
        level=3, dict_data=dictionary, write_content_size=True, write_dict_id=False
    )
    return compressor.compress(data)


def with_dictionary_id(stored: bytes) -> bytes:
    """The frame, its header claiming dictionary id 7 (RFC 8878 3.1.1.1.1: DID flag 1)."""
    descriptor = stored[4]
    header_end = 5 + (0 if descriptor & 0x20 else 1)  # the window descriptor, if any
    return (
        stored[:4]
        + bytes([descriptor & ~0x03 | 0x01])
        + stored[5:header_end]
        + b"\x07"
        + (stored[header_end:])
    )


def with_content_size(stored: bytes, size: int) -> bytes:
    """A raw-block frame declaring `size` bytes of content, holding the data of `stored`."""
    data = zstandard.ZstdDecompressor().decompress(stored)
    return raw_frame(data, declared=size)


def raw_frame(data: bytes, *, declared: int | None = None, block: int = 1 << 17) -> bytes:
    """A frame of raw blocks of at most `block` bytes (past 128 KiB: an oversized block)."""
    size = len(data) if declared is None else declared
    out = bytearray(b"\x28\xb5\x2f\xfd")
    out.append(0x80 | 0x20)  # FCS field of 4 bytes, single segment
    out += size.to_bytes(4, "little")
    pieces = [data[i : i + block] for i in range(0, len(data), block)] or [b""]
    for index, piece in enumerate(pieces):
        last = 1 if index == len(pieces) - 1 else 0
        out += ((len(piece) << 3) | last).to_bytes(3, "little")
        out += piece
    return bytes(out)


# --- bundles ------------------------------------------------------------------------------------


@dataclass
class Draft:
    """A bundle as parts. `lines` are the manifest lines (without LF); `payload` the stored
    chunks. Rendering signs the manifest with `signers` unless `block` is given."""

    lines: list[bytes]
    payload: list[bytes]
    signers: tuple[Signer, ...]
    block_lines: list[bytes] | None = None  # the signature block after its first line
    extra_block_lines: list[bytes] = field(default_factory=list)
    block_head: bytes = b"avobuild-signatures 1"
    trailer: bytes = b""
    manifest_override: bytes | None = None

    def manifest(self) -> bytes:
        if self.manifest_override is not None:
            return self.manifest_override
        return b"".join(line + b"\n" for line in self.lines)

    def signature_block(self) -> bytes:
        manifest = self.manifest()
        lines = self.block_lines
        if lines is None:
            lines = [signer.line(manifest).encode() for signer in self.signers]
        lines = [self.block_head, *lines, *self.extra_block_lines]
        return b"".join(line + b"\n" for line in lines)

    def render(self) -> bytes:
        manifest = self.manifest()
        block = self.signature_block()
        header = b"AVOBUNDLE 1 %010d %010d\n" % (len(manifest), len(block))
        return header + manifest + block + b"".join(self.payload) + self.trailer

    def copy(self, **changes: object) -> Draft:
        fresh = replace(
            self,
            lines=list(self.lines),
            payload=list(self.payload),
            extra_block_lines=list(self.extra_block_lines),
        )
        return replace(fresh, **changes) if changes else fresh


Encoder = Callable[[bytes, int], bytes]


def zstd_encoder(data: bytes, _index: int) -> bytes:
    return frame(data)


def image_part(
    name: str,
    data: bytes,
    chunk_size: int,
    encode: Encoder,
    refs: Sequence[tuple[str, int, str]] = (),
) -> tuple[list[bytes], list[bytes]]:
    """The manifest lines and stored chunks of one image (refs: delta source/target lines)."""
    pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    stored = [encode(piece, index) for index, piece in enumerate(pieces)]
    lines = [f"image {name} {len(data)} {sha(data)} {len(stored)}".encode()]
    lines += [f"{keyword} {size} {digest}".encode() for keyword, size, digest in refs]
    lines += [
        f"chunk {name} {index} {len(chunk)} {sha(chunk)}".encode()
        for index, chunk in enumerate(stored)
    ]
    return lines, stored


def head_lines(
    bundle_type: str = "full",
    *,
    version: int = 1,
    compatible: str = "diffprod-x86_64",
    policy: Sequence[str] = (),
    chunk_size: int = CHUNK,
    compression: str = "zstd",
) -> list[bytes]:
    lines = [
        f"avobuild-manifest {version}",
        f"type {bundle_type}",
        "name diffprod",
        "version 2.0.0",
        f"compatible {compatible}",
        f"build-date {BUILD_DATE}",
        *policy,
        f"chunk-size {chunk_size}",
        f"compression {compression}",
    ]
    return [line.encode() for line in lines]


def full_draft(
    data: bytes,
    signers: tuple[Signer, ...],
    *,
    chunk_size: int = CHUNK,
    compression: str = "zstd",
    encode: Encoder | None = None,
    **head: object,
) -> Draft:
    if encode is None:
        encode = zstd_encoder if compression == "zstd" else (lambda piece, _index: piece)
    lines, payload = image_part("rootfs", data, chunk_size, encode)
    heading = head_lines(chunk_size=chunk_size, compression=compression, **head)  # type: ignore[arg-type]
    return Draft([*heading, *lines], payload, signers)


@dataclass(frozen=True)
class Ref:
    size: int
    sha256: str


def delta_draft(
    stream: bytes,
    source: Ref,
    target: Ref,
    signers: tuple[Signer, ...],
    *,
    encode: Encoder = zstd_encoder,
) -> Draft:
    refs = [("source", source.size, source.sha256), ("target", target.size, target.sha256)]
    lines, payload = image_part("rootfs", stream, CHUNK, encode, refs)
    return Draft([*head_lines("delta"), *lines], payload, signers)


# --- delta streams ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    line: bytes
    payload: bytes = b""


def stream_bytes(
    source: Ref,
    target: Ref,
    ops: Sequence[Op],
    *,
    magic: bytes = b"avobuild-delta 1",
    end: bytes | None = None,
    refs: tuple[bytes, bytes] | None = None,
    trailer: bytes = b"",
) -> bytes:
    source_line, target_line = refs or (
        f"source {source.size} {source.sha256}".encode(),
        f"target {target.size} {target.sha256}".encode(),
    )
    parts = [magic + b"\n", source_line + b"\n", target_line + b"\n"]
    for op in ops:
        parts += [op.line + b"\n", op.payload]
    parts.append((end if end is not None else b"end %d" % len(ops)) + b"\n")
    return b"".join(parts) + trailer


@dataclass(frozen=True)
class DeltaBase:
    """A valid delta from `source` to the target its ops produce."""

    source: bytes
    target: bytes
    ops: tuple[Op, ...]

    @property
    def source_ref(self) -> Ref:
        return Ref(len(self.source), sha(self.source))

    @property
    def target_ref(self) -> Ref:
        return Ref(len(self.target), sha(self.target))

    def stream(self, ops: Sequence[Op] | None = None, **options: object) -> bytes:
        return stream_bytes(
            self.source_ref,
            self.target_ref,
            self.ops if ops is None else ops,
            **options,  # type: ignore[arg-type]
        )


def make_delta(source: bytes, rng: random.Random, *, data_last: bool = False) -> DeltaBase:
    """copy, zero, data, copy, patch, then copy (or data) to the end; the target is the size
    of the source."""
    size = len(source)
    ops: list[Op] = []
    target = bytearray()

    def copy(length: int, source_offset: int) -> None:
        piece = source[source_offset : source_offset + length]
        line = f"copy {len(target)} {length} {source_offset} {sha(piece)}"
        ops.append(Op(line.encode()))
        target.extend(piece)

    def zero(length: int) -> None:
        ops.append(Op(f"zero {len(target)} {length}".encode()))
        target.extend(bytes(length))

    def data(piece: bytes) -> None:
        payload = frame(piece)
        line = f"data {len(target)} {len(piece)} {len(payload)} {sha(piece)}"
        ops.append(Op(line.encode(), payload))
        target.extend(piece)

    def patch(length: int, window_offset: int, window_length: int) -> None:
        window = source[window_offset : window_offset + window_length]
        piece = bytearray(source[window_offset + 100 : window_offset + 100 + length])
        for _ in range(20):
            piece[rng.randrange(length)] = rng.randrange(256)
        payload = patch_frame(bytes(piece), window)
        line = (
            f"patch {len(target)} {length} {window_offset} {window_length} {sha(window)} "
            f"{len(payload)} {sha(bytes(piece))}"
        )
        ops.append(Op(line.encode(), payload))
        target.extend(piece)

    copy(65536, 0)
    zero(8192)
    data(rng.randbytes(4096))
    copy(65536, 200000)
    patch(4096, 290000, 32768)
    rest = size - len(target)
    if data_last:
        copy(rest - 4096, len(target))
        data(rng.randbytes(4096))
    else:
        copy(rest, len(target))
    assert len(target) == size
    return DeltaBase(source, bytes(target), tuple(ops))


# --- zstd-stream payloads (manifest version 3) ----------------------------------------------------


def stream_frames(
    data: bytes,
    chunk_size: int,
    frame_chunks: int,
    *,
    window_log: int = 17,
    content_size: bool = True,
    checksum: bool = False,
) -> list[bytes]:
    """Each chunk's stored bytes: one zstd stream per `frame_chunks` chunks, flushed at every
    chunk boundary (what avobuild's writer does, written here independently)."""
    pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    parameters = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=window_log, write_content_size=content_size, write_checksum=checksum
    )
    stored: list[bytes] = []
    for first in range(0, len(pieces), frame_chunks):
        group = pieces[first : first + frame_chunks]
        encoder = zstandard.ZstdCompressor(compression_params=parameters).compressobj(
            size=sum(map(len, group)) if content_size else -1
        )
        for number, piece in enumerate(group):
            mode = (
                zstandard.COMPRESSOBJ_FLUSH_FINISH
                if number == len(group) - 1
                else zstandard.COMPRESSOBJ_FLUSH_BLOCK
            )
            stored.append(encoder.compress(piece) + encoder.flush(mode))
    return stored


def stream_draft(
    data: bytes,
    signers: tuple[Signer, ...],
    *,
    chunk_size: int = CHUNK,
    frame_chunks: int = 2,
    window_log: int = 17,
    stored: list[bytes] | None = None,
    version: int = 3,
    compression: str | None = None,
) -> Draft:
    """A full bundle with a zstd-stream payload (`stored` replaces the chunks' stored bytes,
    their lines made to match)."""
    if stored is None:
        stored = stream_frames(data, chunk_size, frame_chunks, window_log=window_log)
    pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    lines = [f"image rootfs {len(data)} {sha(data)} {len(pieces)}".encode()]
    lines += [
        f"chunk rootfs {index} {len(chunk)} {sha(chunk)} {sha(piece)}".encode()
        for index, (chunk, piece) in enumerate(zip(stored, pieces, strict=True))
    ]
    heading = head_lines(
        version=version,
        chunk_size=chunk_size,
        compression=compression or f"zstd-stream {frame_chunks} {window_log}",
    )
    return Draft([*heading, *lines], stored, signers)


WINDOW_LINES = (b"window ", b"extent ")


@dataclass(frozen=True)
class DeltaV2Base(DeltaBase):
    """A valid version 2 delta: its `window` and `extent` lines are ops of their own here
    (so that they can be mutated alone), which the `end` count leaves out."""

    def stream(self, ops: Sequence[Op] | None = None, **options: object) -> bytes:
        chosen = self.ops if ops is None else ops
        options.setdefault("magic", b"avobuild-delta 2")
        count = sum(not op.line.startswith(WINDOW_LINES) for op in chosen)
        options.setdefault("end", b"end %d" % count)
        return super().stream(chosen, **options)


def bsdiff_lz(
    new_size: int, control: bytes, diff: bytes, extra: bytes, *, streams: Sequence[bytes] = ()
) -> bytes:
    """A BSDIFFLZ patch (docs/delta-format.md, 7.5) written here, not by avobuild: bsdiff's
    three streams each as a raw LZMA2 stream (or the given `streams` as they are)."""
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
    parts = list(streams) or [
        lzma.compress(part, lzma.FORMAT_RAW, filters=filters) for part in (control, diff, extra)
    ]
    sizes = (len(parts[0]), len(parts[1]), new_size)
    return b"BSDIFFLZ" + b"".join(size.to_bytes(8, "little") for size in sizes) + b"".join(parts)


def bsdiff_lz_of(old: bytes, new: bytes) -> bytes:
    return bsdiff_lz(len(new), *bsdiff4.core.diff(old, new))


def bz2_of_lz(payload: bytes) -> bytes:
    """The BSDIFF40 patch of a BSDIFFLZ one: the same streams, bzip2-compressed."""
    control_size = int.from_bytes(payload[8:16], "little")
    diff_size = int.from_bytes(payload[16:24], "little")
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
    ends = (32, 32 + control_size, 32 + control_size + diff_size, len(payload))
    parts = [
        bz2.compress(lzma.decompress(payload[a:b], lzma.FORMAT_RAW, filters=filters))
        for a, b in itertools.pairwise(ends)
    ]
    sizes = (len(parts[0]), len(parts[1]), int.from_bytes(payload[24:32], "little"))
    return b"BSDIFF40" + b"".join(size.to_bytes(8, "little") for size in sizes) + b"".join(parts)


def make_delta_v2(source: bytes, rng: random.Random) -> DeltaV2Base:
    """copy, zero, a raw window and bspatch, copy, an x86 window and bspatch, copy to the
    end; the bspatch targets are the window's bytes with seeded edits (a moved block and
    changed bytes). The raw one is a BSDIFF40 patch (bsdiff4's), the x86 one a BSDIFFLZ
    patch made the way avobuild's encoder makes it."""
    from avobuild.delta import filters
    from avobuild.delta.stream import Filter

    ops: list[Op] = []
    target = bytearray()

    def copy(length: int, source_offset: int) -> None:
        piece = source[source_offset : source_offset + length]
        ops.append(Op(f"copy {len(target)} {length} {source_offset} {sha(piece)}".encode()))
        target.extend(piece)

    def bspatch(offset: int, length: int, filter_: Filter, start: int, target_start: int) -> None:
        window = source[offset : offset + 2 * length]
        piece = bytearray(window[length // 2 : length // 2 + length])
        piece[100:100] = piece[-300:]
        del piece[-300:]
        for _ in range(30):
            piece[rng.randrange(length)] = rng.randrange(256)
        new = bytes(piece)
        if filter_ is Filter.RAW:
            payload = bsdiff4.diff(window, new)
        else:
            wrapped = filters.wrap_lzma2(filters.forward(new, filter_, target_start))
            payload = bsdiff_lz_of(filters.forward(window, filter_, start), wrapped)
        ops.append(Op(f"window 1 {len(window)} {filter_} {start} {sha(window)}".encode()))
        ops.append(Op(f"extent {offset} {len(window)}".encode()))
        words = f"bspatch {len(target)} {length} {filter_} {target_start} {sha(window)}"
        ops.append(Op(f"{words} {len(payload)} {sha(new)}".encode(), payload))
        target.extend(new)

    copy(65536, 0)
    ops.append(Op(f"zero {len(target)} 8192".encode()))
    target.extend(bytes(8192))
    bspatch(300000, 16384, Filter.RAW, 0, 0)
    copy(40960, len(target))
    bspatch(700000, 12288, Filter.X86, 4096, 8192)
    copy(len(source) - len(target), len(target))
    return DeltaV2Base(source, bytes(target), tuple(ops))


SQUASHFS_LINES = (b"zstd-version ", b"zwindow ", b"zextent ", b"block ")


@dataclass(frozen=True)
class DeltaSquashfsBase(DeltaBase):
    """A valid version 2 delta with squashfs `recompress` operations: its `zstd-version`,
    `zwindow`, `zextent` and `block` lines are ops of their own here (the last block line
    carries the payload), which the `end` count leaves out."""

    def stream(self, ops: Sequence[Op] | None = None, **options: object) -> bytes:
        chosen = self.ops if ops is None else ops
        options.setdefault("magic", b"avobuild-delta 2")
        count = sum(not op.line.startswith(SQUASHFS_LINES) for op in chosen)
        options.setdefault("end", b"end %d" % count)
        return super().stream(chosen, **options)


def host_zstd_version() -> int:
    """The host zstd CLI's version as ZSTD_versionNumber (10504 for 1.5.4)."""
    printed = subprocess.run(["zstd", "-V"], capture_output=True, check=True).stdout
    match = re.search(rb" v(\d+)\.(\d+)\.(\d+)", printed)
    assert match is not None, printed
    major, minor, release = (int(value) for value in match.groups())
    return major * 10000 + minor * 100 + release


def cli_zstd(data: bytes, level: int, work: Path) -> bytes:
    """`zstd -LEVEL --no-check -q -c FILE`, as the appliers run it."""
    block = work / "block"
    block.write_bytes(data)
    stored = subprocess.run(
        ["zstd", f"-{level}", "--no-check", "-q", "-c", str(block)], capture_output=True, check=True
    ).stdout
    block.unlink()
    return stored


def make_delta_squashfs(source: bytes, rng: random.Random, work: Path) -> DeltaSquashfsBase:
    """zstd-version, copy, a zwindow of two raw source extents and a recompress (zstd patch)
    of a zstd block and a raw block, copy, a recompress (bspatch) of one zstd block against
    the same window, copy to the end. The blocks are seeded edits of the window's bytes,
    compressed with the host's zstd CLI at level 15."""
    ops: list[Op] = [Op(b"zstd-version %d" % host_zstd_version())]
    target = bytearray()
    window = source[200000:240000] + source[300000:330000]
    ops.append(Op(f"zwindow 2 {len(window)} {sha(window)}".encode()))
    ops.append(Op(b"zextent 200000 40000 40000 raw"))
    ops.append(Op(b"zextent 300000 30000 30000 raw"))

    def copy(length: int, source_offset: int) -> None:
        piece = source[source_offset : source_offset + length]
        ops.append(Op(f"copy {len(target)} {length} {source_offset} {sha(piece)}".encode()))
        target.extend(piece)

    def edited(piece: bytes) -> bytes:
        out = bytearray(piece)
        for _ in range(20):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)

    def recompress(blocks: list[tuple[bytes, bool]], method: str) -> None:
        unpacked = b"".join(data for data, _ in blocks)
        payload = (
            patch_frame(unpacked, window) if method == "patch" else bsdiff_lz_of(window, unpacked)
        )
        stored = [cli_zstd(data, 15, work) if packed else data for data, packed in blocks]
        length = sum(map(len, stored))
        ops.append(
            Op(
                f"recompress {len(target)} {length} {len(blocks)} 15 {method} {sha(window)} "
                f"{len(payload)}".encode()
            )
        )
        for index, ((data, packed), block) in enumerate(zip(blocks, stored, strict=True)):
            line = f"block {len(data)} {len(block)} {'zstd' if packed else 'raw'} {sha(block)}"
            ops.append(Op(line.encode(), payload if index == len(blocks) - 1 else b""))
            target.extend(block)

    copy(65536, 0)
    # The source is random bytes: a block repeats a piece so that zstd makes it smaller, as
    # squashfs stores compressed only the blocks that compression makes smaller.
    recompress(
        [(edited(window[1000:5000] * 2), True), (edited(window[42000:46000]), False)], "patch"
    )
    copy(40960, len(target))
    recompress([(edited(window[5000:13000] * 2), True)], "bspatch")
    copy(len(source) - len(target), len(target))
    return DeltaSquashfsBase(source, bytes(target), tuple(ops))
