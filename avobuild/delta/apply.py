"""Applying a delta stream: the host-side reference applier (docs/delta-format.md, section 4).

The stream is read front to back from any byte source (a file, or a bundle's verified chunks
joined by `ChunkStream`), so memory is one operation's payload and dictionary — at most
`MAX_EXTENT` each — plus a 1 MiB copy buffer, whatever the image sizes. The source and the
target are file descriptors with a base offset, so the same code rebuilds an image file or
writes a slot partition inside a disk image while reading the active one.

Every operation is checked before its bytes are written: a COPY's source bytes and a PATCH's
dictionary against their hashes, a decoded DATA/PATCH frame against its target hash. (A COPY
longer than 8 MiB is written in pieces and its hash checked with the last one; its source was
already verified as part of the whole source image.) The whole target hash is checked at the
end.

Version 2: a `window` line's extents are read from the source and hashed before any
`bspatch` uses them; a `bspatch` names the window's hash and filter, its patch's header
(BSDIFFLZ or BSDIFF40, read within bounds by `delta.bspatch`) must declare the size the
operation produces, and its output (after the inverse branch filter, if any) is checked
against the operation's hash before it is written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from avobuild.bundle.manifest import ChunkEntry, ImageEntry, ImageRef
from avobuild.bundle.reader import decode_frame
from avobuild.delta import filters
from avobuild.delta.bspatch import apply_patch
from avobuild.delta.recompress import RecompressState
from avobuild.delta.stream import (
    MAX_LINE,
    Filter,
    Op,
    OpKind,
    Recompress,
    UnpackedWindow,
    Window,
    ZstdVersion,
    lzma2_wrapped_size,
    parse_extent,
    parse_magic,
    parse_op,
    parse_ref,
)
from avobuild.errors import BundleError

_COPY_SIZE = 1 << 20

ApplyProgress = Callable[[int, int], None]


class ChunkStream:
    """A byte reader over an iterator of byte strings (a bundle image's verified chunks)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._position = 0
        self.offset = 0
        # The delta stream version, once `read_delta_header` has read the first line.
        self.version = 1

    def read(self, size: int) -> bytes:
        """Exactly `size` bytes, fewer only at the end of the stream."""
        parts = []
        wanted = size
        while wanted:
            if self._position == len(self._buffer):
                try:
                    self._buffer = next(self._chunks)
                except StopIteration:
                    break
                self._position = 0
            part = self._buffer[self._position : self._position + wanted]
            self._position += len(part)
            wanted -= len(part)
            parts.append(part)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def readline(self, limit: int) -> bytes:
        """One line with its LF, at most `limit` bytes; whatever is left at the end."""
        parts = []
        length = 0
        while length < limit:
            if self._position == len(self._buffer):
                try:
                    self._buffer = next(self._chunks)
                except StopIteration:
                    break
                self._position = 0
            newline = self._buffer.find(b"\n", self._position, self._position + limit - length)
            stop = (
                newline + 1
                if newline >= 0
                else min(len(self._buffer), self._position + limit - length)
            )
            parts.append(self._buffer[self._position : stop])
            length += stop - self._position
            self._position = stop
            if newline >= 0:
                break
        data = b"".join(parts)
        self.offset += len(data)
        return data


def file_chunks(path: Path, size: int = _COPY_SIZE) -> Iterator[bytes]:
    """A file's bytes as an iterator of blocks, for `ChunkStream`."""
    try:
        with path.open("rb") as handle:
            while block := handle.read(size):
                yield block
    except OSError as error:
        raise BundleError(f"{path}: cannot read: {error.strerror or error}") from None


def image_chunks(
    chunks: Iterator[tuple[ImageEntry, ChunkEntry, bytes]], image: ImageEntry
) -> Iterator[bytes]:
    """The data of `image`'s chunks, taken from a bundle's `iter_chunks` in payload order."""
    for _ in range(image.chunk_count):
        entry, _chunk, data = next(chunks)
        if entry.name != image.name:
            raise BundleError(f"chunk of image {entry.name} where {image.name} was expected")
        yield data


@dataclass(frozen=True)
class Region:
    """A byte range of an open file: an image file (offset 0) or a partition in a disk."""

    fd: int
    offset: int
    name: str


def read_delta_header(stream: ChunkStream, name: str) -> tuple[ImageRef, ImageRef]:
    """The source and target refs from the first three lines of a delta stream."""
    stream.version = parse_magic(_line(stream, name))
    source = parse_ref(_line(stream, name), "source")
    target = parse_ref(_line(stream, name), "target")
    return source, target


def region_sha256(region: Region, size: int) -> tuple[str, int]:
    """The sha256 of the first `size` bytes of `region` and how many it holds (fewer at the
    end of a file): the one "read it back and hash it" of sources and written slots."""
    digest = hashlib.sha256()
    position = 0
    while position < size:
        block = os.pread(region.fd, min(_COPY_SIZE, size - position), region.offset + position)
        if not block:
            break
        digest.update(block)
        position += len(block)
    return digest.hexdigest(), position


def check_source(source: Region, ref: ImageRef) -> None:
    """Refuse a source whose first `ref.size` bytes do not hash to `ref.sha256`."""
    digest, held = region_sha256(source, ref.size)
    if held < ref.size:
        raise BundleError(
            f"{source.name}: holds {held} bytes, the delta needs a source of {ref.size}"
        )
    if digest != ref.sha256:
        raise BundleError(
            f"{source.name}: is not the source this delta was made from: the sha256 of its "
            f"first {ref.size} bytes is {digest}, the delta needs {ref.sha256}; "
            "nothing was written"
        )


def apply_delta(
    stream: ChunkStream,
    name: str,
    source: Region,
    target: Region,
    *,
    expected: tuple[ImageRef, ImageRef] | None = None,
    check_source_first: bool = True,
    progress: ApplyProgress | None = None,
) -> ImageRef:
    """Replay the delta `stream` (called `name` in messages) from `source` into `target`.

    `expected`: the (source, target) refs the stream must declare (the signed manifest's).
    With `check_source_first` the whole source is hashed before anything is written; an
    installer that already did so may skip it. Returns the target ref that was produced.
    """
    source_ref, target_ref = read_checked_header(stream, name, expected)
    if check_source_first:
        check_source(source, source_ref)
    return replay_delta(stream, name, source, source_ref, target, target_ref, progress)


def read_checked_header(
    stream: ChunkStream, name: str, expected: tuple[ImageRef, ImageRef] | None
) -> tuple[ImageRef, ImageRef]:
    refs = read_delta_header(stream, name)
    if expected is not None and refs != expected:
        raise BundleError(
            f"{name}: the delta stream's source and target {refs} differ from the manifest's "
            f"{expected}"
        )
    return refs


def replay_delta(
    stream: ChunkStream,
    name: str,
    source: Region,
    source_ref: ImageRef,
    target: Region | None,
    target_ref: ImageRef,
    progress: ApplyProgress | None = None,
) -> ImageRef:
    """Apply the operations after the header; check the end line and the target hash.

    With `target` None nothing is written: every operation is still parsed, bounded, read
    from the source, decoded and checked against its hash, and the rebuilt target's hash is
    checked, so a stream that passes will apply without an error (`check_delta`)."""
    decompressor = zstandard.ZstdDecompressor()
    target_hash = hashlib.sha256()
    position = 0
    count = 0
    window: _LoadedWindow | None = None
    squashfs = RecompressState()
    first = True
    while True:
        where = f"{name}: byte offset {stream.offset}"
        parsed = _parse(_line(stream, name), where, stream.version)
        if isinstance(parsed, ZstdVersion | UnpackedWindow):
            _squashfs_line(squashfs, parsed, first, stream, name, where, source, source_ref)
            first = False
            continue
        first = False
        if isinstance(parsed, Window):
            window = None  # let the old window go before the new one is read (peak memory)
            window = _load_window(parsed, stream, name, where, source, source_ref)
            continue
        if isinstance(parsed, int):
            if parsed != count:
                raise BundleError(f"{where}: end line counts {parsed} operations, saw {count}")
            break
        op = parsed
        if op.offset != position or op.end > target_ref.size:
            raise BundleError(
                f"{where}: operation for target bytes [{op.offset}, {op.end}) does not follow "
                f"byte {position} within the target's {target_ref.size} bytes"
            )
        if isinstance(op, Recompress):
            data = squashfs.rebuild(op, lambda: _line(stream, name), stream.read, where)
            _write(target, op.offset, data)
            target_hash.update(data)
        elif op.kind is OpKind.BSPATCH:
            data = _bspatch(op, stream, where, window)
            _write(target, op.offset, data)
            target_hash.update(data)
        else:
            _apply_op(op, stream, where, source, source_ref, target, target_hash, decompressor)
        position = op.end
        count += 1
        if progress is not None:
            progress(position, target_ref.size)
    if position != target_ref.size:
        raise BundleError(f"{name}: ends at target byte {position} of {target_ref.size}")
    if stream.read(1):
        raise BundleError(f"{name}: data after the end line at byte offset {stream.offset - 1}")
    if target_hash.hexdigest() != target_ref.sha256:
        raise BundleError(
            f"{name}: the rebuilt target's sha256 is {target_hash.hexdigest()}, expected "
            f"{target_ref.sha256}"
        )
    return target_ref


def _squashfs_line(
    state: RecompressState,
    parsed: ZstdVersion | UnpackedWindow,
    first: bool,
    stream: ChunkStream,
    name: str,
    where: str,
    source: Region,
    source_ref: ImageRef,
) -> None:
    """Version 2's squashfs lines that are not operations (docs/delta-format.md, 8)."""
    if isinstance(parsed, ZstdVersion):
        state.set_version(parsed, first, where)
    else:
        state.load_window(
            parsed,
            lambda: _line(stream, name),
            lambda offset, size: _pread(source, offset, size),
            source_ref.size,
            where,
        )


def _line(stream: ChunkStream, name: str) -> str:
    offset = stream.offset
    line = stream.readline(MAX_LINE)
    if not line.endswith(b"\n"):
        what = "ends" if len(line) < MAX_LINE else f"has a line over {MAX_LINE} bytes"
        raise BundleError(f"{name}: delta stream {what} at byte offset {offset}")
    try:
        return line[:-1].decode("ascii")
    except UnicodeDecodeError:
        raise BundleError(f"{name}: non-ASCII delta line at byte offset {offset}") from None


def _parse(
    line: str, where: str, version: int
) -> Op | Window | int | ZstdVersion | UnpackedWindow | Recompress:
    try:
        return parse_op(line, version)
    except BundleError as error:
        raise BundleError(f"{where}: {error}") from None


@dataclass(frozen=True)
class _LoadedWindow:
    """The current window: its line, and the bytes `bspatch` diffs against (filtered)."""

    line: Window
    data: bytes


def _load_window(
    window: Window,
    stream: ChunkStream,
    name: str,
    where: str,
    source: Region,
    source_ref: ImageRef,
) -> _LoadedWindow:
    """Read a window's extent lines and bytes; refuse it unless they hash to its sha256."""
    extents = []
    for _ in range(window.count):
        try:
            extents.append(parse_extent(_line(stream, name)))
        except BundleError as error:
            raise BundleError(f"{where}: {error}") from None
    if sum(length for _, length in extents) != window.length:
        raise BundleError(f"{where}: the window's extents do not add up to {window.length} bytes")
    for offset, length in extents:
        if length > source_ref.size - offset:
            raise BundleError(
                f"{where}: window extent reads past the source's {source_ref.size} bytes"
            )
    data = b"".join(_pread(source, offset, length) for offset, length in extents)
    if hashlib.sha256(data).hexdigest() != window.sha256:
        raise BundleError(f"{where}: the window's source bytes do not match its hash")
    if window.filter is not Filter.RAW:
        data = filters.forward(data, window.filter, window.start)
    return _LoadedWindow(window, data)


def _bspatch(op: Op, stream: ChunkStream, where: str, window: _LoadedWindow | None) -> bytes:
    """The target bytes of a BSPATCH operation, checked against its hash."""
    if window is None or window.line.sha256 != op.source_sha256:
        raise BundleError(
            f"{where}: bspatch names window {op.source_sha256}, which is not the current one"
        )
    if window.line.filter is not op.filter:
        raise BundleError(
            f"{where}: bspatch filter {op.filter} differs from the window's {window.line.filter}"
        )
    payload = stream.read(op.payload_size)
    if len(payload) != op.payload_size:
        raise BundleError(f"{where}: the stream ends inside an operation's payload")
    produced = op.length if op.filter is Filter.RAW else lzma2_wrapped_size(op.length)
    data = apply_patch(window.data, payload, produced, where)
    if op.filter is not Filter.RAW:
        data = filters.inverse(data, op.filter, op.start, op.length)
    if hashlib.sha256(data).hexdigest() != op.sha256:
        raise BundleError(f"{where}: patched bytes do not match the operation's hash")
    return data


def _apply_op(
    op: Op,
    stream: ChunkStream,
    where: str,
    source: Region,
    source_ref: ImageRef,
    target: Region | None,
    target_hash: hashlib._Hash,
    decompressor: zstandard.ZstdDecompressor,
) -> None:
    if op.kind is OpKind.ZERO:
        zeros = bytes(min(_COPY_SIZE, op.length))
        done = 0
        while done < op.length:
            part = zeros[: min(len(zeros), op.length - done)]
            _write(target, op.offset + done, part)
            target_hash.update(part)
            done += len(part)
        return
    if op.kind is OpKind.COPY:
        if op.source_offset + op.length > source_ref.size:
            raise BundleError(f"{where}: copy reads past the source's {source_ref.size} bytes")
        digest = hashlib.sha256()
        parts = []
        done = 0
        # Hash before writing: blocks of up to 1 MiB are checked as a whole op at the end,
        # so long copies are staged in pieces and the op hash is checked before the last write.
        while done < op.length:
            size = min(_COPY_SIZE, op.length - done)
            block = _pread(source, op.source_offset + done, size)
            digest.update(block)
            parts.append((op.offset + done, block))
            done += size
            if done < op.length and len(parts) * _COPY_SIZE >= 8 * _COPY_SIZE:
                for offset, data in parts:
                    _write(target, offset, data)
                    target_hash.update(data)
                parts = []
        if digest.hexdigest() != op.sha256:
            raise BundleError(f"{where}: copied source bytes do not match the operation's hash")
        for offset, data in parts:
            _write(target, offset, data)
            target_hash.update(data)
        return
    payload = stream.read(op.payload_size)
    if len(payload) != op.payload_size:
        raise BundleError(f"{where}: the stream ends inside an operation's payload")
    if op.kind is OpKind.PATCH:
        if op.source_offset + op.source_length > source_ref.size:
            raise BundleError(f"{where}: patch reads past the source's {source_ref.size} bytes")
        window = _pread(source, op.source_offset, op.source_length)
        if hashlib.sha256(window).hexdigest() != op.source_sha256:
            raise BundleError(f"{where}: the patch's source window does not match its hash")
        dictionary = zstandard.ZstdCompressionDict(window, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        data = _decompress(zstandard.ZstdDecompressor(dict_data=dictionary), payload, op, where)
    else:
        data = _decompress(decompressor, payload, op, where)
    if hashlib.sha256(data).hexdigest() != op.sha256:
        raise BundleError(f"{where}: decoded bytes do not match the operation's hash")
    _write(target, op.offset, data)
    target_hash.update(data)


def _decompress(
    decompressor: zstandard.ZstdDecompressor, payload: bytes, op: Op, where: str
) -> bytes:
    try:
        return decode_frame(payload, op.length, decompressor)
    except BundleError as error:
        raise BundleError(f"{where}: the operation's payload {error}") from None


def _pread(region: Region, offset: int, size: int) -> bytes:
    data = os.pread(region.fd, size, region.offset + offset)
    while len(data) < size:
        more = os.pread(region.fd, size - len(data), region.offset + offset + len(data))
        if not more:
            raise BundleError(f"{region.name}: ends before byte {offset + size}")
        data += more
    return data


def _write(region: Region | None, offset: int, data: bytes) -> None:
    if region is None:
        return
    view = memoryview(data)
    while view:
        written = os.pwrite(region.fd, view, region.offset + offset)
        view = view[written:]
        offset += written


def check_delta(
    stream: ChunkStream,
    name: str,
    source: Region,
    expected: tuple[ImageRef, ImageRef],
    progress: ApplyProgress | None = None,
) -> None:
    """Validate a whole delta stream against its source without writing anything: the header
    against the manifest's refs, every operation's grammar, bounds and tiling (so no extent
    lies outside the target or the source, and none overlaps another), every payload as one
    zstd frame, every hash, and the end. An installer reading a file runs this first."""
    source_ref, target_ref = read_checked_header(stream, name, expected)
    replay_delta(stream, name, source, source_ref, None, target_ref, progress)


def apply_delta_file(
    delta: Path, source: Path, output: Path, *, progress: ApplyProgress | None = None
) -> ImageRef:
    """Apply a bare delta stream file to the image `source`, writing `output`."""
    stream = ChunkStream(file_chunks(delta))
    return apply_to_file(stream, str(delta), source, output, progress=progress)


def apply_to_file(
    stream: ChunkStream,
    name: str,
    source: Path,
    output: Path,
    *,
    expected: tuple[ImageRef, ImageRef] | None = None,
    progress: ApplyProgress | None = None,
) -> ImageRef:
    """Apply to an image file; `output` is written under a temporary name, then renamed."""
    temporary = output.with_name(f".{output.name}.partial")
    try:
        source_fd = os.open(source, os.O_RDONLY)
    except OSError as error:
        raise BundleError(f"{source}: cannot open: {error.strerror or error}") from None
    try:
        # The source is checked before the output is even created.
        source_ref, target_ref = read_checked_header(stream, name, expected)
        source_region = Region(source_fd, 0, str(source))
        check_source(source_region, source_ref)
        try:
            target_fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as error:
            raise BundleError(f"{output}: cannot create: {error.strerror or error}") from None
        try:
            replay_delta(
                stream,
                name,
                source_region,
                source_ref,
                Region(target_fd, 0, str(output)),
                target_ref,
                progress,
            )
            os.ftruncate(target_fd, target_ref.size)
            os.fsync(target_fd)
        finally:
            os.close(target_fd)
        temporary.replace(output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(source_fd)
    return target_ref
