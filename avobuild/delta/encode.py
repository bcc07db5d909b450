"""Encoding a planned delta into a delta stream (docs/delta-format.md).

COPY and ZERO extents become one line each. A CHANGED extent becomes a `patch` operation: the
target bytes compressed by zstd with the planned source window as a raw-content dictionary,
exactly what `zstd -d --patch-from=WINDOW` reverses on a device, or a `data` operation (plain
zstd frame) when there is no source or the dictionary does not help.

Extents are encoded on a thread pool (zstandard and hashlib release the GIL, so both cores
work) with at most a few extents in flight; results are written in target order. Each worker
reads its own ranges with `os.pread`, so memory is a few extents and dictionaries whatever
the image sizes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from avobuild.bundle.manifest import ImageRef
from avobuild.delta.plan import (
    DEFAULT_DICTIONARY_SIZE,
    DEFAULT_EXTENT_SIZE,
    ExtentKind,
    PlannedExtent,
    plan_delta,
)
from avobuild.delta.stream import Op, OpKind, render_end, render_header, render_op
from avobuild.errors import BundleError

DEFAULT_DELTA_LEVEL = 9
# A plain frame is tried too only when the patch kept more than 1/PLAIN_WORTH_TRYING of it.
PLAIN_WORTH_TRYING = 4
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


class _Encoder:
    def __init__(
        self, source_fd: int, source: Path, target_fd: int, target: Path, level: int
    ) -> None:
        self._source_fd = source_fd
        self._source = source
        self._target_fd = target_fd
        self._target = target
        self._level = level
        self._local = threading.local()

    def _plain(self) -> zstandard.ZstdCompressor:
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "plain", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(
                level=self._level, write_content_size=True, write_checksum=False
            )
            self._local.plain = compressor
        return compressor

    def encode(self, extent: PlannedExtent) -> tuple[Op, bytes]:
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
) -> DeltaSummary:
    """Write the delta stream turning `source` into `target` to `output`.

    The refs are the images' sizes and hashes (known from the bundles' manifests); the target
    is rehashed on the way, so a ref that does not match its file is an error, not a delta
    that can never apply.
    """
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise BundleError(f"delta level: expected 1 to {zstandard.MAX_COMPRESSION_LEVEL}")
    report = progress or _no_progress
    extents = plan_delta(
        source,
        source_ref.size,
        target,
        target_ref.size,
        extent_size=extent_size,
        dictionary_size=dictionary_size,
    )
    workers = max(1, threads if threads is not None else (os.cpu_count() or 1))
    counts = {kind.value: 0 for kind in OpKind}
    op_bytes = {kind.value: 0 for kind in OpKind}
    written = 0
    target_hash = hashlib.sha256()

    def emit(op: Op, payload: bytes) -> None:
        nonlocal written
        line = render_op(op)
        output.write(line)
        output.write(payload)
        written += len(line) + len(payload)
        counts[op.kind.value] += 1
        op_bytes[op.kind.value] += op.length

    header = render_header(source_ref, target_ref)
    output.write(header)
    written += len(header)
    source_fd = os.open(source, os.O_RDONLY)
    try:
        target_fd = os.open(target, os.O_RDONLY)
        try:
            encoder = _Encoder(source_fd, source, target_fd, target, level)
            pending: deque[tuple[PlannedExtent, Future[tuple[Op, bytes]]]] = deque()
            done = 0
            report(0, target_ref.size)
            with ThreadPoolExecutor(workers, thread_name_prefix="avobuild-delta") as pool:
                try:
                    for extent in [*extents, None]:
                        if extent is not None:
                            pending.append((extent, pool.submit(encoder.encode, extent)))
                        while pending and (extent is None or len(pending) >= 2 * workers):
                            finished, future = pending.popleft()
                            op, payload = future.result()
                            emit(op, payload)
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
