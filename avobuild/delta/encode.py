"""Encoding a planned delta into a delta stream (docs/delta-format.md).

COPY and ZERO extents become one line each. A CHANGED extent becomes a `patch` operation: the
target bytes compressed by zstd with the planned source window as a raw-content dictionary,
exactly what `zstd -d --patch-from=WINDOW` reverses on a device, or a `data` operation (plain
zstd frame) when there is no source or the dictionary does not help.

Stream version 2 (the default) adds file awareness: for ext4 images the changed pieces of a
file that zstd did not make small are grouped (neighbouring pieces of one file, a span of at
most `files.MAX_GROUP_SPAN`) and each group is diffed once with bsdiff against one window of
the file's old version (`delta.files`, `delta.bsdiff`: one suffix sort per group, not per
piece), raw and, with `branch_filters`, for x86-64/AArch64 ELF files also after the branch
filter (`delta.filters`), keeping the variant that gives the group fewer bytes; each piece
then takes the smaller of its zstd payload and its bsdiff patch. The pieces of a group share
one `window` line. bsdiff holds the GIL, so groups run in a process pool (one process per
core) next to the zstd threads.

Extents are encoded on a thread pool (zstandard and hashlib release the GIL, so both cores
work) with at most a few extents in flight; results are written in target order. Each worker
reads its own ranges with `os.pread`, so memory is a few extents and dictionaries whatever
the image sizes.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import BinaryIO

import zstandard

from avobuild.bundle.manifest import ImageRef
from avobuild.delta import filters
from avobuild.delta.bsdiff import diff_pieces, shares_strings
from avobuild.delta.files import (
    MAX_FILE_WINDOW,
    MAX_GROUP_SPAN,
    FilePairing,
    FilePiece,
    FileWindow,
    file_pairing,
)
from avobuild.delta.plan import (
    DEFAULT_DICTIONARY_SIZE,
    DEFAULT_EXTENT_SIZE,
    ExtentKind,
    PlannedExtent,
    plan_runs,
    split_runs,
)
from avobuild.delta.squashfs_encode import encode_squashfs_delta, squashfs_images
from avobuild.delta.stream import (
    READABLE_VERSIONS,
    STREAM_VERSION,
    Filter,
    Op,
    OpKind,
    Window,
    max_payload_size,
    render_end,
    render_header,
    render_op,
    render_window,
)
from avobuild.errors import BundleError

DEFAULT_DELTA_LEVEL = 9
# A plain frame is tried too only when the patch kept more than 1/PLAIN_WORTH_TRYING of it.
PLAIN_WORTH_TRYING = 4
# bsdiff is not tried when zstd already made the piece this small, or 1/BSDIFF_RATIO of it.
BSDIFF_WORTH_TRYING = 256
BSDIFF_RATIO = 100
# A piece whose zstd payload kept at least this share of it (3/4) is compressed data: bsdiff
# runs on it only when `bsdiff.shares_strings` finds some of it in the window.
INCOMPRESSIBLE = (3, 4)
_READ_SIZE = 1 << 20
# How far encoding runs ahead of a group whose bsdiff is not done: at most MAX_HELD_BYTES of
# payloads and GROUPS_PER_WORKER closed groups per process wait to be written. A group of a
# large file takes seconds in one process; with 2 groups per process the others ran dry behind
# it (1.6 of 2 cores on the Debian amd64 corpus, 1.85 with 64; the parent's RSS grows by about
# 0.2 MB per waiting group: 213 MB at 64 per process).
MAX_HELD_BYTES = 64 << 20
GROUPS_PER_WORKER = 64

DeltaProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class DeltaSummary:
    """What a delta stream holds, for reports and `delta stats`."""

    source: ImageRef
    target: ImageRef
    stream_size: int
    op_counts: dict[str, int]
    op_bytes: dict[str, int]


def _no_progress(_done: int, _total: int) -> None:
    pass


def _pread_exact(fd: int, size: int, offset: int, path: Path) -> bytes:
    parts = []
    position = offset
    end = offset + size
    while position < end:
        part = os.pread(fd, min(end - position, 16 << 20), position)
        if not part:
            raise BundleError(f"{path}: ends before byte offset {end}")
        parts.append(part)
        position += len(part)
    return b"".join(parts)


def _hash_range(fd: int, offset: int, length: int, path: Path) -> str:
    digest = hashlib.sha256()
    position = offset
    while position < offset + length:
        part = _pread_exact(fd, min(_READ_SIZE, offset + length - position), position, path)
        digest.update(part)
        position += len(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Encoded:
    op: Op
    payload: bytes
    window: Window | None = None  # the window a BSPATCH op needs


@dataclass(frozen=True)
class _GroupDiff:
    """What bsdiff made of a group: the variant's filter, the window's hash, and one patch
    per piece (None where an applier would refuse it: `bsdiff.diff_pieces`)."""

    filter: Filter
    window_sha256: str
    patches: tuple[bytes | None, ...]


def _bsdiff_group(
    source: str,
    target: str,
    window: FileWindow,
    pieces: tuple[tuple[int, FilePiece], ...],
    zstd_sizes: tuple[int, ...],
) -> _GroupDiff:
    """bsdiff of a group's pieces (target offset, piece) against its window, raw and in the
    window's branch filter; the variant whose patches, each against its piece's zstd size,
    add up to fewer bytes (a process pool job: it opens the images itself)."""
    with Path(source).open("rb") as handle:
        old = b"".join(os.pread(handle.fileno(), size, where) for where, size in window.extents)
    with Path(target).open("rb") as handle:
        new = [os.pread(handle.fileno(), piece.length, offset) for offset, piece in pieces]
    window_sha256 = hashlib.sha256(old).hexdigest()

    def cost(patches: Sequence[bytes | None]) -> int:
        return sum(
            size if patch is None else min(len(patch), size)
            for patch, size in zip(patches, zstd_sizes, strict=True)
        )

    # Pieces zstd left nearly whole are diffed only when they share strings with the window.
    tried = [
        size * INCOMPRESSIBLE[1] < len(data) * INCOMPRESSIBLE[0] or shares_strings(old, data)
        for data, size in zip(new, zstd_sizes, strict=True)
    ]

    def diff_tried(window_bytes: bytes, targets: Sequence[bytes]) -> list[bytes | None]:
        chosen = [target for target, on in zip(targets, tried, strict=True) if on]
        patches = iter(diff_pieces(window_bytes, chosen))
        return [next(patches) if on else None for on in tried]

    best = _GroupDiff(Filter.RAW, window_sha256, tuple(diff_tried(old, new)))
    if window.filter is not Filter.RAW:
        wrapped = []
        for data, (_, piece) in zip(new, pieces, strict=True):
            filtered = filters.wrap_lzma2(filters.forward(data, window.filter, piece.start))
            # The device inverts what the encoder filtered: check that it gives the bytes back.
            if filters.inverse(filtered, window.filter, piece.start, piece.length) != data:
                return best
            wrapped.append(filtered)
        patches = diff_tried(filters.forward(old, window.filter, window.start), wrapped)
        if cost(patches) < cost(best.patches):
            best = _GroupDiff(window.filter, window_sha256, tuple(patches))
    return best


class _Group:
    """Neighbouring changed pieces of one paired file, diffed against one window."""

    def __init__(self, offset: int, piece: FilePiece) -> None:
        self.path = piece.path
        self.first = piece.start
        self.end = piece.end
        self.target_end = offset + piece.length
        self.members: list[tuple[int, FilePiece, int]] = []  # target offset, piece, zstd size
        self.window: FileWindow | None = None
        self.line: Window | None = None
        self.diff: Future[_GroupDiff] | None = None
        self.closed = False

    def fits(self, offset: int, piece: FilePiece) -> bool:
        return (
            piece.path == self.path
            and max(self.end, piece.end) - min(self.first, piece.start) <= MAX_GROUP_SPAN
        )

    def join(self, offset: int, piece: FilePiece, zstd_size: int) -> int:
        """Add a piece; its index in the group."""
        self.members.append((offset, piece, zstd_size))
        self.first = min(self.first, piece.start)
        self.end = max(self.end, piece.end)
        self.target_end = max(self.target_end, offset + piece.length)
        return len(self.members) - 1

    def ready(self) -> bool:
        return self.closed and (self.diff is None or self.diff.done())


@dataclass
class _Held:
    """An encoded extent waiting for its turn in target order (and for its group's diff)."""

    extent: PlannedExtent
    encoded: _Encoded
    group: _Group | None = None
    index: int = 0


class _Encoder:
    def __init__(
        self,
        source_fd: int,
        source: Path,
        target_fd: int,
        target: Path,
        level: int,
        pairing: FilePairing | None = None,
        processes: Executor | None = None,
        branch_filters: bool = False,
    ) -> None:
        self._source_fd = source_fd
        self._source = source
        self._target_fd = target_fd
        self._target = target
        self._level = level
        self._pairing = pairing
        self._processes = processes
        self._branch_filters = branch_filters
        self._local = threading.local()

    def _plain(self) -> zstandard.ZstdCompressor:
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "plain", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(
                level=self._level, write_content_size=True, write_checksum=False
            )
            self._local.plain = compressor
        return compressor

    def encode(self, extent: PlannedExtent) -> _Encoded:
        """The zstd operation (or copy, zero) for `extent`."""
        op, payload = self._encode_v1(extent)
        return _Encoded(op, payload)

    def piece(self, extent: PlannedExtent, encoded: _Encoded) -> FilePiece | None:
        """Where a changed extent lies in a paired file, if zstd left it worth a bsdiff."""
        if (
            self._pairing is None
            or extent.kind is not ExtentKind.CHANGED
            or encoded.op.payload_size <= max(BSDIFF_WORTH_TRYING, extent.length // BSDIFF_RATIO)
        ):
            return None
        return self._pairing.locate(extent.offset, extent.length)

    def close(self, group: _Group) -> None:
        """Find the group's window and start its bsdiff in the process pool."""
        group.closed = True
        assert self._pairing is not None and self._processes is not None
        window = self._pairing.window(group.path, group.first, group.end)
        if window is None:
            return
        if not self._branch_filters:
            window = replace(window, filter=Filter.RAW)
        group.window = window
        group.diff = self._processes.submit(
            _bsdiff_group,
            str(self._source),
            str(self._target),
            window,
            tuple((offset, piece) for offset, piece, _ in group.members),
            tuple(size for _, _, size in group.members),
        )

    @staticmethod
    def choose(held: _Held, current_window: Window | None) -> _Encoded:
        """The smaller of a grouped piece's zstd operation and its bsdiff patch (counting
        the window line when this piece would be the first to need it)."""
        op = held.encoded.op
        group = held.group
        if group is None or group.diff is None or group.window is None:
            return held.encoded
        diff = group.diff.result()
        patch = diff.patches[held.index]
        if patch is None:
            return held.encoded
        if group.line is None:
            group.line = Window(
                len(group.window.extents),
                group.window.length,
                diff.filter,
                group.window.start if diff.filter is not Filter.RAW else 0,
                diff.window_sha256,
                group.window.extents,
            )
        line = group.line
        cost = len(patch) + (len(render_window(line)) if line != current_window else 0)
        if cost >= op.payload_size or len(patch) > max_payload_size(op.length):
            return held.encoded
        _, piece, _ = group.members[held.index]
        bspatch = Op(
            OpKind.BSPATCH,
            op.offset,
            op.length,
            op.sha256,
            source_sha256=diff.window_sha256,
            payload_size=len(patch),
            filter=diff.filter,
            start=piece.start if diff.filter is not Filter.RAW else 0,
        )
        return _Encoded(bspatch, patch, line)

    def _encode_v1(self, extent: PlannedExtent) -> tuple[Op, bytes]:
        if extent.kind is ExtentKind.ZERO:
            return Op(OpKind.ZERO, extent.offset, extent.length), b""
        if extent.kind is ExtentKind.COPY:
            digest = _hash_range(self._target_fd, extent.offset, extent.length, self._target)
            return (
                Op(
                    OpKind.COPY,
                    extent.offset,
                    extent.length,
                    digest,
                    source_offset=extent.source_offset,
                ),
                b"",
            )
        data = _pread_exact(self._target_fd, extent.length, extent.offset, self._target)
        digest = hashlib.sha256(data).hexdigest()
        best: tuple[Op, bytes] | None = None
        if extent.source_length:
            window = _pread_exact(
                self._source_fd, extent.source_length, extent.source_offset, self._source
            )
            dictionary = zstandard.ZstdCompressionDict(
                window, dict_type=zstandard.DICT_TYPE_RAWCONTENT
            )
            patched = zstandard.ZstdCompressor(
                level=self._level,
                dict_data=dictionary,
                write_content_size=True,
                write_checksum=False,
                write_dict_id=False,
            ).compress(data)
            best = (
                Op(
                    OpKind.PATCH,
                    extent.offset,
                    extent.length,
                    digest,
                    source_offset=extent.source_offset,
                    source_length=extent.source_length,
                    source_sha256=hashlib.sha256(window).hexdigest(),
                    payload_size=len(patched),
                ),
                patched,
            )
            # A dictionary that removed most of the bytes cannot lose to no dictionary.
            if len(patched) * PLAIN_WORTH_TRYING < extent.length:
                return best
        plain = self._plain().compress(data)
        if best is None or len(plain) < best[0].payload_size:
            best = (
                Op(OpKind.DATA, extent.offset, extent.length, digest, payload_size=len(plain)),
                plain,
            )
        return best


def encode_delta(
    source: Path,
    source_ref: ImageRef,
    target: Path,
    target_ref: ImageRef,
    output: BinaryIO,
    *,
    level: int = DEFAULT_DELTA_LEVEL,
    extent_size: int = DEFAULT_EXTENT_SIZE,
    dictionary_size: int = DEFAULT_DICTIONARY_SIZE,
    threads: int | None = None,
    progress: DeltaProgress | None = None,
    version: int = STREAM_VERSION,
    branch_filters: bool = False,
) -> DeltaSummary:
    """Write the delta stream turning `source` into `target` to `output`.

    The refs are the images' sizes and hashes (known from the bundles' manifests); the target
    is rehashed on the way, so a ref that does not match its file is an error, not a delta
    that can never apply. The stream is version 2 only when files could be paired (both
    images ext4, `delta.files`); otherwise, or with `version` 1, it is a version 1 stream
    that every applier reads. `branch_filters` also diffs the pieces of x86-64 and AArch64
    ELF files after xz's branch filter and keeps the smaller variant per group: it doubles
    bsdiff's time for 0-1.4 % fewer bytes on the measured corpora (docs/performance.md), so
    it is off by default.
    """
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise BundleError(f"delta level: expected 1 to {zstandard.MAX_COMPRESSION_LEVEL}")
    if version not in READABLE_VERSIONS:
        raise BundleError(f"delta stream version {version}: expected one of {READABLE_VERSIONS}")
    report = progress or _no_progress
    squashfs = squashfs_images(source, target) if version >= 2 else None
    if squashfs is not None:
        squashed = encode_squashfs_delta(
            source,
            source_ref,
            target,
            target_ref,
            output,
            squashfs,
            level=level,
            workers=max(1, threads if threads is not None else (os.cpu_count() or 1)),
            progress=report,
        )
        return DeltaSummary(source_ref, target_ref, *astuple(squashed))
    runs = plan_runs(source, source_ref.size, target, target_ref.size)
    pairing = file_pairing(source, source_ref.size, target) if version >= 2 else None
    extents = split_runs(
        runs,
        source_ref.size,
        extent_size=extent_size,
        dictionary_size=dictionary_size,
        cuts=pairing.cuts() if pairing is not None else None,
    )
    workers = max(1, threads if threads is not None else (os.cpu_count() or 1))
    counts = {kind.value: 0 for kind in OpKind}
    op_bytes = {kind.value: 0 for kind in OpKind}
    written = 0
    target_hash = hashlib.sha256()
    current_window: Window | None = None

    def emit(encoded: _Encoded) -> None:
        nonlocal written, current_window
        op = encoded.op
        line = render_op(op)
        if encoded.window is not None and encoded.window != current_window:
            line = render_window(encoded.window) + line
            current_window = encoded.window
        output.write(line)
        output.write(encoded.payload)
        written += len(line) + len(encoded.payload)
        counts[op.kind.value] += 1
        op_bytes[op.kind.value] += op.length

    header = render_header(source_ref, target_ref, 2 if pairing and pairing.paired else 1)
    output.write(header)
    written += len(header)
    source_fd = os.open(source, os.O_RDONLY)
    try:
        target_fd = os.open(target, os.O_RDONLY)
        try:
            processes = (
                _start_processes(workers) if pairing is not None and pairing.paired else None
            )
            encoder = _Encoder(
                source_fd, source, target_fd, target, level, pairing, processes, branch_filters
            )
            pending: deque[tuple[PlannedExtent, Future[_Encoded]]] = deque()
            held: deque[_Held] = deque()
            groups: deque[_Group] = deque()  # closed, not yet emitted
            group: _Group | None = None  # the open one
            done = 0
            held_bytes = 0  # payloads of the held extents
            report(0, target_ref.size)

            def close_open() -> None:
                nonlocal group
                if group is not None:
                    encoder.close(group)
                    groups.append(group)
                    group = None

            def hold(extent: PlannedExtent, encoded: _Encoded) -> None:
                """Queue an encoded extent, grouping it when bsdiff may do better."""
                nonlocal group, held_bytes
                held_bytes += len(encoded.payload)
                piece = encoder.piece(extent, encoded) if processes is not None else None
                if group is not None and (
                    extent.offset - group.target_end > MAX_FILE_WINDOW
                    or (piece is not None and not group.fits(extent.offset, piece))
                ):
                    close_open()
                if piece is None:
                    held.append(_Held(extent, encoded))
                    return
                if group is None:
                    group = _Group(extent.offset, piece)
                index = group.join(extent.offset, piece, encoded.op.payload_size)
                held.append(_Held(extent, encoded, group, index))

            def behind() -> bool:
                return held_bytes > MAX_HELD_BYTES or len(groups) > GROUPS_PER_WORKER * workers

            def flush(final: bool) -> None:
                """Emit held extents in order: those ready, or any while encoding is too far
                ahead (`behind`), or at the end."""
                nonlocal done, held_bytes
                while held:
                    front = held[0]
                    group_of = front.group
                    if (
                        group_of is not None
                        and not group_of.ready()
                        and not (group_of.closed and (final or behind()))
                    ):
                        return
                    held.popleft()
                    held_bytes -= len(front.encoded.payload)
                    emit(encoder.choose(front, current_window))
                    _hash_target_extent(target_hash, target_fd, front.extent, target)
                    done += front.extent.length
                    report(done, target_ref.size)
                    if front.group is not None and front.index == len(front.group.members) - 1:
                        # Groups close in target order, so the one finished is the first.
                        groups.popleft()

            with (
                processes or _NoPool(),
                ThreadPoolExecutor(workers, thread_name_prefix="avobuild-delta") as pool,
            ):
                try:
                    for extent in [*extents, None]:
                        if extent is not None:
                            pending.append((extent, pool.submit(encoder.encode, extent)))
                        while pending and (extent is None or len(pending) >= 2 * workers):
                            finished, future = pending.popleft()
                            hold(finished, future.result())
                            flush(final=False)
                    close_open()
                    flush(final=True)
                finally:
                    for _, future in pending:
                        future.cancel()
                    for waiting in groups:
                        if waiting.diff is not None:
                            waiting.diff.cancel()
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)
    end = render_end(sum(counts.values()))
    output.write(end)
    written += len(end)
    if target_hash.hexdigest() != target_ref.sha256:
        raise BundleError(
            f"{target}: sha256 is {target_hash.hexdigest()}, expected {target_ref.sha256}"
        )
    return DeltaSummary(source_ref, target_ref, written, counts, op_bytes)


def _start_processes(workers: int) -> ProcessPoolExecutor:
    """A pool of forked processes for bsdiff, started now, while this process runs no other
    thread (forking a process whose threads hold locks is unsafe), by a first empty job."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    pool.submit(int).result()
    return pool


class _NoPool:
    """Stands in for the process pool when no file is diffed with bsdiff."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def _hash_target_extent(digest: hashlib._Hash, fd: int, extent: PlannedExtent, path: Path) -> None:
    if extent.kind is ExtentKind.ZERO:
        zeros = bytes(min(_READ_SIZE, extent.length))
        remaining = extent.length
        while remaining:
            digest.update(zeros[: min(remaining, len(zeros))])
            remaining -= min(remaining, len(zeros))
        return
    position = extent.offset
    while position < extent.end:
        part = _pread_exact(fd, min(_READ_SIZE, extent.end - position), position, path)
        digest.update(part)
        position += len(part)
