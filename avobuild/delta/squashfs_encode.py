"""Encoding a delta between two zstd squashfs images (docs/delta-format.md, section 8).

A byte-level delta of a compressed filesystem is nearly the whole image: every changed file
block is new compressed bytes. This encoder works on squashfs's own units instead, the
stored data blocks and fragment blocks (`delta.squashfs`):

1. A target block whose stored bytes exist anywhere in the source is a `copy` (consecutive
   ones coalesce).
2. The changed blocks of a file paired with its old version (same path, else the normalised
   path, else the base name, as for ext4) are grouped, at most `GROUP_SIZE` unpacked bytes
   each; a changed fragment block is a group of its own, paired with the old fragment
   blocks of its members' old versions. Each block of a group is recompressed with the
   host's `zstd` CLI at the image's level (`delta.recompress`); a group of blocks that all
   reproduce becomes a `recompress` operation: its unpacked bytes as the smaller of a zstd
   frame and a bsdiff patch against a `zwindow` of the old version's unpacked blocks. A
   block that does not reproduce, and everything else (superblock, metadata tables, blocks
   of new files, padding), is encoded as in version 1 (`zero`, `data`, `patch` with a source
   window at the mapped position).

Groups are encoded in a pool of forked processes (bsdiff and the zstd CLI run there),
results are written in target order. Memory is a few groups and their windows.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import posixpath
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from avobuild.bundle.manifest import ImageRef
from avobuild.delta.bsdiff import diff_pieces
from avobuild.delta.recompress import (
    block_line,
    compress_block,
    zstd_cli_version,
)
from avobuild.delta.squashfs import (
    ZSTD_COMPRESSION,
    SquashFile,
    SquashImage,
    StoredBlock,
    read_block,
    read_squashfs,
    squashfs_compression,
)
from avobuild.delta.stream import (
    MAX_RECOMPRESS_BLOCKS,
    MAX_RECOMPRESS_LEVEL,
    MAX_WINDOW_EXTENTS,
    Op,
    OpKind,
    PackedExtent,
    Packing,
    Recompress,
    RecompressMethod,
    UnpackedWindow,
    max_payload_size,
    render_end,
    render_header,
    render_op,
    render_recompress,
    render_unpacked_window,
    render_zstd_version,
)
from avobuild.errors import BundleError

# The unpacked bytes one recompress op rebuilds at most, and its window: the old version
# around the same proportional position, the group plus WINDOW_MARGIN, at most MAX_WINDOW
# (bsdiff's suffix sort costs time per window byte, as for ext4).
GROUP_SIZE = 1 << 20
WINDOW_MARGIN = 1 << 20
MAX_WINDOW = 4 << 20
# A changed fragment block's window: the old fragment blocks of its members, at most this.
MAX_FRAGMENT_WINDOW = 2 << 20
# bsdiff is not tried when zstd made the payload this small, or 1/BSDIFF_RATIO of the bytes.
BSDIFF_WORTH_TRYING = 256
BSDIFF_RATIO = 100
PIECE_SIZE = 1 << 20
DICTIONARY_SIZE = 2 << 20
DICTIONARY_MARGIN = 64 << 10

Progress = Callable[[int, int], None]
_HASH_SUFFIX = re.compile(r"-[0-9a-f]{8}(?=[.-])")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class _Copy:
    offset: int
    length: int
    source_offset: int


@dataclass(frozen=True)
class _Group:
    """Target blocks rebuilt by one recompress op, with the source blocks of their window."""

    blocks: tuple[StoredBlock, ...]
    window: tuple[StoredBlock, ...]

    @property
    def offset(self) -> int:
        return self.blocks[0].offset

    @property
    def length(self) -> int:
        return self.blocks[-1].end - self.blocks[0].offset


@dataclass(frozen=True)
class _Raw:
    """Target bytes encoded as in version 1, with a source dictionary window (length 0:
    none)."""

    offset: int
    length: int
    source_offset: int
    source_length: int


_Item = _Copy | _Group | _Raw


@dataclass(frozen=True)
class _Encoded:
    """One item's lines and payloads, in stream order, and what it counts."""

    parts: tuple[bytes, ...]
    window: UnpackedWindow | None
    counts: tuple[tuple[str, int, int], ...]  # (op kind, ops, target bytes)


@dataclass(frozen=True)
class _Job:
    source: str
    target: str
    level: int
    recompress_level: int
    block_size: int
    item: _Item
    bsdiff: bool


def squashfs_images(source: Path, target: Path) -> tuple[SquashImage, SquashImage] | None:
    """Both images read, when both are zstd squashfs whose level the zstd CLI can repeat;
    None otherwise (the delta is then version 1's block-level one). A zstd squashfs image
    that cannot be read is an error, not a reason to fall back."""
    if not squashfs_compression(source) == squashfs_compression(target) == ZSTD_COMPRESSION:
        return None
    images = read_squashfs(source), read_squashfs(target)
    if not 1 <= images[1].compression_level <= MAX_RECOMPRESS_LEVEL:
        return None
    return images


def _normalised(path: str) -> str:
    return _DIGITS.sub("#", _HASH_SUFFIX.sub("", path))


def pair_files(old: dict[str, SquashFile], new: dict[str, SquashFile]) -> dict[str, str]:
    """new path -> old path: the same path, else the normalised path, else the base name,
    each only when unique on both sides (the rules of `delta.files` for ext4)."""

    def unique(paths: list[str], key: Callable[[str], str]) -> dict[str, str]:
        keys = {path: key(path) for path in paths}
        counts = Counter(keys.values())
        return {value: path for path, value in keys.items() if counts[value] == 1}

    old_normal, old_name = unique(list(old), _normalised), unique(list(old), posixpath.basename)
    new_normal, new_name = unique(list(new), _normalised), unique(list(new), posixpath.basename)
    pairs = {}
    for path in new:
        if path in old:
            pairs[path] = path
        elif new_normal.get(_normalised(path)) == path and _normalised(path) in old_normal:
            pairs[path] = old_normal[_normalised(path)]
        elif (
            new_name.get(posixpath.basename(path)) == path and posixpath.basename(path) in old_name
        ):
            pairs[path] = old_name[posixpath.basename(path)]
    return pairs


def _stored_digests(image: SquashImage, fd: int) -> dict[bytes, int]:
    """sha256 of each stored data and fragment block -> its first offset."""
    digests: dict[bytes, int] = {}
    for block in sorted(_all_blocks(image), key=lambda block: block.offset):
        data = os.pread(fd, block.stored_size, block.offset)
        digests.setdefault(hashlib.sha256(data).digest(), block.offset)
    return digests


def _all_blocks(image: SquashImage) -> Iterator[StoredBlock]:
    for file in image.files.values():
        yield from (block for block in file.blocks if block is not None)
    yield from image.fragments


def _old_window(old: SquashImage, file: SquashFile, start: int, length: int) -> list[StoredBlock]:
    """The old file's blocks around unpacked bytes [start, +length) of the new file mapped to
    the same proportional position; its fragment block when it has no data blocks."""
    blocks = [block for block in file.blocks if block is not None]
    if not blocks:
        return [old.fragments[file.fragment]] if file.fragment >= 0 else []
    span_blocks = min(
        MAX_WINDOW_EXTENTS, -(-min(MAX_WINDOW, length + WINDOW_MARGIN) // old.block_size)
    )
    middle = (start + length // 2) // old.block_size
    first = max(0, min(len(file.blocks) - span_blocks, middle - span_blocks // 2))
    return [block for block in file.blocks[first : first + span_blocks] if block is not None]


def plan_squashfs(
    old: SquashImage, new: SquashImage, source_fd: int, target_fd: int, target_size: int
) -> list[_Item]:
    """The items tiling the target, in order."""
    source_digests = _stored_digests(old, source_fd)
    pairs = pair_files(old.files, new.files)
    # Each stored target block once (mksquashfs shares the blocks of identical files), with
    # its group key: (path, block index) for a file's data block, fragment index otherwise.
    owners: dict[int, tuple[StoredBlock, str | None, int]] = {}
    for path, file in new.files.items():
        for index, block in enumerate(file.blocks):
            if block is not None:
                owners.setdefault(block.offset, (block, path, index))
    for index, fragment in enumerate(new.fragments):
        owners.setdefault(fragment.offset, (fragment, None, index))
    members: dict[int, list[str]] = {}
    for path, file in new.files.items():
        if file.fragment >= 0:
            members.setdefault(file.fragment, []).append(path)
    items: list[_Item] = []
    position = 0
    run: list[StoredBlock] = []
    run_key: tuple[str, int] | None = None

    def flush_run() -> None:
        nonlocal run, run_key
        if run and run_key is not None:
            path = run_key[0]
            first_index = run_key[1] - len(run) + 1
            window = _old_window(
                old,
                old.files[pairs[path]],
                first_index
                * new.block_size
                * old.files[pairs[path]].size
                // max(1, new.files[path].size),
                sum(block.length for block in run),
            )
            items.append(_Group(tuple(run), tuple(window)) if window else _raw(run))
        run, run_key = [], None

    def _raw(blocks: list[StoredBlock]) -> _Raw:
        return _Raw(blocks[0].offset, blocks[-1].end - blocks[0].offset, 0, 0)

    for offset in sorted(owners):
        block, owner, index = owners[offset]
        if offset < position:
            raise BundleError(f"{new.path}: squashfs blocks overlap at byte offset {offset}")
        digest = hashlib.sha256(os.pread(target_fd, block.stored_size, offset)).digest()
        source_offset = source_digests.get(digest)
        extends = (
            owner is not None
            and run_key is not None
            and run_key == (owner, index - 1)
            and run[-1].end == offset
            and sum(member.length for member in run) + block.length <= GROUP_SIZE
            and len(run) < MAX_RECOMPRESS_BLOCKS
        )
        if not extends or source_offset is not None:
            flush_run()
        if offset > position:
            items.append(_Raw(position, offset - position, 0, 0))
        position = block.end
        if source_offset is not None:
            previous = items[-1] if items else None
            if (
                isinstance(previous, _Copy)
                and previous.offset + previous.length == offset
                and previous.source_offset + previous.length == source_offset
            ):
                items[-1] = _Copy(
                    previous.offset, previous.length + block.stored_size, previous.source_offset
                )
            else:
                items.append(_Copy(offset, block.stored_size, source_offset))
        elif owner is not None and owner in pairs:
            run.append(block)
            run_key = (owner, index)
        elif owner is None and index in members:
            window = _fragment_window(old, new, pairs, members[index], index)
            items.append(_Group((block,), window) if window else _raw([block]))
        else:
            items.append(_raw([block]))
    flush_run()
    if position < target_size:
        items.append(_Raw(position, target_size - position, 0, 0))
    return _with_dictionaries(_merge_raw(items), old, new)


def _fragment_window(
    old: SquashImage, new: SquashImage, pairs: dict[str, str], paths: list[str], index: int
) -> tuple[StoredBlock, ...]:
    """The old fragment blocks holding the old versions of a fragment block's members (and
    the old block of the same index, where mksquashfs usually put the same files)."""
    indexes = sorted(
        {
            old.files[pairs[path]].fragment
            for path in paths
            if path in pairs and old.files[pairs[path]].fragment >= 0
        }
        | ({index} if index < len(old.fragments) else set())
    )
    chosen = indexes[: max(1, min(MAX_WINDOW_EXTENTS, MAX_FRAGMENT_WINDOW // new.block_size))]
    return tuple(old.fragments[i] for i in chosen)


def _merge_raw(items: list[_Item]) -> list[_Item]:
    merged: list[_Item] = []
    for item in items:
        previous = merged[-1] if merged else None
        if isinstance(item, _Raw) and isinstance(previous, _Raw):
            merged[-1] = _Raw(previous.offset, previous.length + item.length, 0, 0)
        else:
            merged.append(item)
    return merged


def _with_dictionaries(items: list[_Item], old: SquashImage, new: SquashImage) -> list[_Item]:
    """Raw items cut into pieces, each with a source window at its mapped position: metadata
    against the source's metadata, the data area proportionally."""
    result: list[_Item] = []
    for item in items:
        if not isinstance(item, _Raw):
            result.append(item)
            continue
        for offset in range(item.offset, item.offset + item.length, PIECE_SIZE):
            length = min(PIECE_SIZE, item.offset + item.length - offset)
            if offset >= new.inode_table_start:
                mapped = old.inode_table_start + (offset - new.inode_table_start)
            else:
                mapped = offset * old.inode_table_start // max(1, new.inode_table_start)
            size = min(DICTIONARY_SIZE, 2 * length + DICTIONARY_MARGIN, old.size)
            start = max(0, min(old.size - size, mapped - (size - length) // 2))
            result.append(_Raw(offset, length, start, size))
    return result


def _encode(job: _Job) -> _Encoded:
    """One item's stream bytes (a process pool job: it opens the images itself)."""
    source_fd = os.open(job.source, os.O_RDONLY)
    target_fd = os.open(job.target, os.O_RDONLY)
    try:
        item = job.item
        if isinstance(item, _Copy):
            data = os.pread(target_fd, item.length, item.offset)
            op = Op(
                OpKind.COPY, item.offset, item.length, _sha(data), source_offset=item.source_offset
            )
            return _Encoded((render_op(op),), None, (("copy", 1, item.length),))
        if isinstance(item, _Raw):
            return _encode_raw(item, source_fd, target_fd, job.level)
        return _encode_group(job, item, source_fd, target_fd)
    finally:
        os.close(source_fd)
        os.close(target_fd)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _encode_raw(item: _Raw, source_fd: int, target_fd: int, level: int) -> _Encoded:
    data = os.pread(target_fd, item.length, item.offset)
    if not data.strip(b"\0"):
        return _Encoded(
            (render_op(Op(OpKind.ZERO, item.offset, item.length)),),
            None,
            (("zero", 1, item.length),),
        )
    digest = _sha(data)
    plain = zstandard.ZstdCompressor(level=level, write_checksum=False).compress(data)
    best = (Op(OpKind.DATA, item.offset, item.length, digest, payload_size=len(plain)), plain)
    if item.source_length:
        window = os.pread(source_fd, item.source_length, item.source_offset)
        dictionary = zstandard.ZstdCompressionDict(window, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        patched = zstandard.ZstdCompressor(
            level=level, dict_data=dictionary, write_checksum=False, write_dict_id=False
        ).compress(data)
        if len(patched) < len(plain):
            best = (
                Op(
                    OpKind.PATCH,
                    item.offset,
                    item.length,
                    digest,
                    source_offset=item.source_offset,
                    source_length=item.source_length,
                    source_sha256=_sha(window),
                    payload_size=len(patched),
                ),
                patched,
            )
    op, payload = best
    return _Encoded((render_op(op), payload), None, ((op.kind.value, 1, item.length),))


def _unpack(image: str, fd: int, block_size: int, block: StoredBlock) -> bytes:
    """A stored block's unpacked bytes (`read_block` with what a job knows of its image)."""
    stand_in = SquashImage(Path(image), os.fstat(fd).st_size, block_size, 0, 0, 0, {}, ())
    return read_block(stand_in, fd, block)


def _packing(block: StoredBlock) -> Packing:
    return Packing.ZSTD if block.compressed else Packing.RAW


def _encode_group(job: _Job, group: _Group, source_fd: int, target_fd: int) -> _Encoded:
    """A recompress op for each run of the group's blocks that the zstd CLI reproduces; the
    blocks it does not, as version 1 ops."""
    window_parts = [_unpack(job.source, source_fd, job.block_size, block) for block in group.window]
    window_data = b"".join(window_parts)
    window = UnpackedWindow(
        len(group.window),
        len(window_data),
        _sha(window_data),
        tuple(
            PackedExtent(block.offset, block.stored_size, len(part), _packing(block))
            for block, part in zip(group.window, window_parts, strict=True)
        ),
    )
    parts: list[bytes] = []
    counts: list[tuple[str, int, int]] = []
    emitted: UnpackedWindow | None = None
    run: list[tuple[StoredBlock, bytes, bytes]] = []

    def raw(offset: int, length: int) -> None:
        encoded = _encode_raw(_Raw(offset, length, 0, 0), source_fd, target_fd, job.level)
        parts.extend(encoded.parts)
        counts.extend(encoded.counts)

    def flush() -> None:
        nonlocal emitted
        if not run:
            return
        offset, length = run[0][0].offset, run[-1][0].end - run[0][0].offset
        encoded = _recompress_op(job, run, window, window_data) if window_data else None
        if encoded is None:
            raw(offset, length)
        else:
            if emitted != window:
                parts.append(render_unpacked_window(window))
                emitted = window
            parts.extend(encoded)
            counts.append(("recompress", 1, length))
        run.clear()

    with tempfile.TemporaryDirectory(prefix="avobuild-squashfs-") as work:
        for block in group.blocks:
            stored = os.pread(target_fd, block.stored_size, block.offset)
            unpacked = _unpack(job.target, target_fd, job.block_size, block)
            # The encoder checks every block with the zstd the stream names.
            if (
                not block.compressed
                or compress_block(unpacked, job.recompress_level, Path(work)) == stored
            ):
                run.append((block, stored, unpacked))
            else:
                flush()
                raw(block.offset, block.stored_size)
    flush()
    return _Encoded(tuple(parts), emitted, tuple(counts))


def _recompress_op(
    job: _Job,
    run: list[tuple[StoredBlock, bytes, bytes]],
    window: UnpackedWindow,
    window_data: bytes,
) -> tuple[bytes, bytes] | None:
    """The op's lines and payload, None when it would not beat the stored bytes.

    The zstd payload is at the delta's level (9 by default), as for ext4: on 40 sampled
    groups of the Debian arm64 squashfs corpus, level 19 took 22 x level 9's time for
    0.8 % less in the smaller of zstd and bsdiff (docs/performance.md)."""
    unpacked = b"".join(data for _, _, data in run)
    dictionary = zstandard.ZstdCompressionDict(
        window_data, dict_type=zstandard.DICT_TYPE_RAWCONTENT
    )
    payload = zstandard.ZstdCompressor(
        level=job.level, dict_data=dictionary, write_checksum=False, write_dict_id=False
    ).compress(unpacked)
    method = RecompressMethod.PATCH
    # As for ext4: where zstd already made the payload tiny, bsdiff's suffix sort is not
    # worth its time.
    if job.bsdiff and len(payload) > max(BSDIFF_WORTH_TRYING, len(unpacked) // BSDIFF_RATIO):
        patch = diff_pieces(window_data, [unpacked])[0]
        if patch is not None and len(patch) < len(payload):
            payload, method = patch, RecompressMethod.BSPATCH
    length = run[-1][0].end - run[0][0].offset
    if len(payload) >= length or len(payload) > max_payload_size(len(unpacked)):
        return None
    op = Recompress(
        run[0][0].offset,
        length,
        len(run),
        job.recompress_level,
        method,
        window.sha256,
        len(payload),
        tuple(block_line(stored, len(data), _packing(block)) for block, stored, data in run),
    )
    return render_recompress(op), payload


@dataclass(frozen=True)
class SquashfsSummary:
    """What `encode_squashfs_delta` wrote: stream bytes, and per op kind ops and bytes."""

    stream_size: int
    op_counts: dict[str, int]
    op_bytes: dict[str, int]


def encode_squashfs_delta(
    source: Path,
    source_ref: ImageRef,
    target: Path,
    target_ref: ImageRef,
    output: BinaryIO,
    images: tuple[SquashImage, SquashImage],
    *,
    level: int,
    workers: int,
    progress: Progress,
) -> SquashfsSummary:
    """Write the version 2 stream turning squashfs `source` into squashfs `target`."""
    old, new = images
    source_fd = os.open(source, os.O_RDONLY)
    try:
        target_fd = os.open(target, os.O_RDONLY)
        try:
            items = plan_squashfs(old, new, source_fd, target_fd, target_ref.size)
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)
    counts = {kind.value: 0 for kind in OpKind} | {"recompress": 0}
    op_bytes = dict.fromkeys(counts, 0)
    header = render_header(source_ref, target_ref, 2)
    if any(isinstance(item, _Group) for item in items):
        header += render_zstd_version(zstd_cli_version())
    output.write(header)
    written = len(header)
    target_hash = hashlib.sha256()
    current: UnpackedWindow | None = None
    done = 0
    progress(0, target_ref.size)
    jobs = (
        _Job(
            str(source),
            str(target),
            level,
            new.compression_level,
            new.block_size,
            item,
            bsdiff=isinstance(item, _Group) and len(item.window) > 0,
        )
        for item in items
    )
    pool = ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("fork"))
    with pool, Path(target).open("rb") as check:
        pending: list[tuple[_Item, Future[_Encoded]]] = []
        for job in [*jobs, None]:
            if job is not None:
                pending.append((job.item, pool.submit(_encode, job)))
            while pending and (job is None or len(pending) >= 4 * max(1, workers)):
                item, future = pending.pop(0)
                encoded = future.result()
                parts = list(encoded.parts)
                # A window the previous group already loaded is not sent again.
                if encoded.window is not None and encoded.window == current:
                    parts.remove(render_unpacked_window(current))
                current = encoded.window or current
                for part in parts:
                    output.write(part)
                    written += len(part)
                for kind, ops, length in encoded.counts:
                    counts[kind] += ops
                    op_bytes[kind] += length
                offset = item.offset
                remaining = item.length
                while remaining:
                    block = os.pread(check.fileno(), min(remaining, 1 << 20), offset)
                    if not block:
                        raise BundleError(f"{target}: ends before byte offset {offset + remaining}")
                    target_hash.update(block)
                    offset += len(block)
                    remaining -= len(block)
                done = item.offset + item.length
                progress(done, target_ref.size)
    end = render_end(sum(counts.values()))
    output.write(end)
    written += len(end)
    if target_hash.hexdigest() != target_ref.sha256:
        raise BundleError(
            f"{target}: sha256 is {target_hash.hexdigest()}, expected {target_ref.sha256}"
        )
    return SquashfsSummary(written, counts, op_bytes)
