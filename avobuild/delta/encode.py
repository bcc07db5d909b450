"""Encoding a planned delta into a delta stream (docs/delta-format.md).

COPY and ZERO extents become one line each. A CHANGED extent becomes a `patch` operation: the
target bytes compressed by zstd with the planned source window as a raw-content dictionary,
exactly what `zstd -d --patch-from=WINDOW` reverses on a device, or a `data` operation (plain
zstd frame) when there is no source or the dictionary does not help.

Stream version 2 (the default) adds file awareness: for ext4 images each changed piece of a
file is also diffed with bsdiff against its own old version (`delta.files`), with and without
the file's branch filter (`delta.filters`), and the smallest of all candidates is kept; a
`bspatch` operation follows the `window` line naming its old bytes. bsdiff holds the GIL, so
it runs in a process pool (one process per core) next to the zstd threads.

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
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import BinaryIO

import bsdiff4
import zstandard

from avobuild.bundle.manifest import ImageRef
from avobuild.delta import filters
from avobuild.delta.files import FilePairing, FileWindow, file_pairing
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
_READ_SIZE = 1 << 20

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
class _Candidate:
    filter: Filter
    start: int
    window_sha256: str
    payload: bytes


def _bsdiff_candidate(
    source: str, target: str, window: FileWindow, offset: int, length: int
) -> _Candidate:
    """The smaller bsdiff patch of target [offset, +length) against the window, raw or in
    the window's branch filter (a process pool job: it opens the images itself)."""
    with Path(source).open("rb") as handle:
        old = b"".join(os.pread(handle.fileno(), size, where) for where, size in window.extents)
    with Path(target).open("rb") as handle:
        new = os.pread(handle.fileno(), length, offset)
    window_sha256 = hashlib.sha256(old).hexdigest()
    best = _Candidate(Filter.RAW, 0, window_sha256, bsdiff4.diff(old, new))
    if window.filter is not Filter.RAW:
        wrapped = filters.wrap_lzma2(filters.forward(new, window.filter, window.target_start))
        # The device inverts what the encoder filtered: check that it gives the bytes back.
        if filters.inverse(wrapped, window.filter, window.target_start, length) == new:
            patch = bsdiff4.diff(filters.forward(old, window.filter, window.start), wrapped)
            if len(patch) < len(best.payload):
                best = _Candidate(window.filter, window.target_start, window_sha256, patch)
    return best


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
    ) -> None:
        self._source_fd = source_fd
        self._source = source
        self._target_fd = target_fd
        self._target = target
        self._level = level
        self._pairing = pairing
        self._processes = processes
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
        """The smallest operation for `extent`: zstd, then bsdiff against its file's old
        version where there is one."""
        op, payload = self._encode_v1(extent)
        window = (
            self._pairing.window(extent.offset, extent.length)
            if self._pairing is not None
            and self._processes is not None
            and extent.kind is ExtentKind.CHANGED
            and op.payload_size > max(BSDIFF_WORTH_TRYING, extent.length // BSDIFF_RATIO)
            else None
        )
        if window is None:
            return _Encoded(op, payload)
        assert self._processes is not None
        candidate = self._processes.submit(
            _bsdiff_candidate,
            str(self._source),
            str(self._target),
            window,
            extent.offset,
            extent.length,
        ).result()
        window_line = Window(
            len(window.extents),
            window.length,
            candidate.filter,
            window.start if candidate.filter is not Filter.RAW else 0,
            candidate.window_sha256,
            window.extents,
        )
        cost = len(candidate.payload) + len(render_window(window_line))
        if cost >= op.payload_size or len(candidate.payload) > max_payload_size(extent.length):
            return _Encoded(op, payload)
        bspatch = Op(
            OpKind.BSPATCH,
            extent.offset,
            extent.length,
            op.sha256,
            source_sha256=candidate.window_sha256,
            payload_size=len(candidate.payload),
            filter=candidate.filter,
            start=candidate.start,
        )
        return _Encoded(bspatch, candidate.payload, window_line)

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
) -> DeltaSummary:
    """Write the delta stream turning `source` into `target` to `output`.

    The refs are the images' sizes and hashes (known from the bundles' manifests); the target
    is rehashed on the way, so a ref that does not match its file is an error, not a delta
    that can never apply. The stream is version 2 only when files could be paired (both
    images ext4, `delta.files`); otherwise, or with `version` 1, it is a version 1 stream
    that every applier reads.
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
            encoder = _Encoder(source_fd, source, target_fd, target, level, pairing, processes)
            pending: deque[tuple[PlannedExtent, Future[_Encoded]]] = deque()
            done = 0
            report(0, target_ref.size)
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
                            emit(future.result())
                            _hash_target_extent(target_hash, target_fd, finished, target)
                            done += finished.length
                            report(done, target_ref.size)
                finally:
                    for _, future in pending:
                        future.cancel()
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
