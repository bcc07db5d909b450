"""File-aware deltas: each changed file of the new image diffed against its own old version.

For ext4 images (`fs.ext4.ext4_file_map`, debugfs extents) and uncompressed erofs images
(`fs.erofs_map.erofs_file_map`, read from the image) every regular file of the target image
is paired with a file of the source image, trying in turn the same path, the same path with
digits and `-xxxxxxxx` hash suffixes normalised (a kernel ABI directory `6.1.0-50` ->
`6.1.0-57`, auditwheel's vendored `libfoo-1a2b3c4d.so`) when that is unique, and the same
base name when that is unique.

The planner cuts changed target runs wherever a file's extent begins or ends
(`FilePairing.cuts`), so each changed piece lies in one file at a known file offset
(`FilePairing.locate`). The encoder groups neighbouring changed pieces of one file (a span of
at most `MAX_GROUP_SPAN` bytes of the new file) and diffs them against one window
(`FilePairing.window`): the old file's bytes around the same proportional position, as the
source image's byte ranges (`FileWindow`), at most `MAX_FILE_WINDOW` bytes: the `window`
line of stream version 2 (docs/delta-format.md).
"""

from __future__ import annotations

import bisect
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avobuild.delta.stream import MAX_WINDOW_EXTENTS, Filter
from avobuild.errors import AvobuildError
from avobuild.fs.common import FileBlocks, FileMap
from avobuild.fs.erofs_map import erofs_block_size, erofs_file_map
from avobuild.fs.ext4 import ext4_block_size, ext4_file_map

# The window of a group of pieces: their span plus this margin, at most MAX_FILE_WINDOW
# (bsdiff's suffix sort costs time per window byte; a wider margin found no more on
# recompiled libraries). A device holds a window and, while it filters it, its filtered copy:
# 2 x 6 MiB stays within the 16 MiB of temporary space an update may use.
WINDOW_MARGIN = 1 << 20
MAX_FILE_WINDOW = 6 << 20
MAX_GROUP_SPAN = MAX_FILE_WINDOW - WINDOW_MARGIN
_ELF_MAGIC = b"\x7fELF"
_ELF_MACHINES = {62: Filter.X86, 183: Filter.ARM64}
_HASH_SUFFIX = re.compile(r"-[0-9a-f]{8}(?=[.-])")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class FileWindow:
    """The window of a group of changed target pieces of one file: `extents` (source offset,
    length) joined, `start` its offset in the old file; `filter` the branch filter worth
    trying (RAW: none, or the window has holes)."""

    path: str
    extents: tuple[tuple[int, int], ...]
    start: int
    filter: Filter

    @property
    def length(self) -> int:
        return sum(length for _, length in self.extents)


@dataclass(frozen=True)
class FilePiece:
    """A changed target piece that lies in one paired file: `path` in the target image,
    `start` its offset in that file, `length` bytes."""

    path: str
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def _normalised(path: str) -> str:
    return _DIGITS.sub("#", _HASH_SUFFIX.sub("", path))


def _unique(paths: list[str], key: Callable[[str], str]) -> dict[str, str]:
    """key -> path for the keys that exactly one path has."""
    keys = {path: key(path) for path in paths}
    counts = Counter(keys.values())
    return {value: path for path, value in keys.items() if counts[value] == 1}


class FilePairing:
    """Which old file each new file's changed pieces are diffed against."""

    def __init__(
        self,
        source_size: int,
        source_map: FileMap,
        target: Path,
        target_map: FileMap,
    ) -> None:
        self._source_size = source_size
        self._source_map = source_map
        self._target_map = target_map
        old_paths = list(source_map.files)
        by_normalised = _unique(old_paths, _normalised)
        by_name = _unique(old_paths, posixpath.basename)
        new_normalised = _unique(list(target_map.files), _normalised)
        new_name = _unique(list(target_map.files), posixpath.basename)
        self._pairs: dict[str, str] = {}
        for path in target_map.files:
            if path in source_map.files:
                self._pairs[path] = path
                continue
            normal = _normalised(path)
            name = posixpath.basename(path)
            if normal in by_normalised and new_normalised.get(normal) == path:
                self._pairs[path] = by_normalised[normal]
            elif name in by_name and new_name.get(name) == path:
                self._pairs[path] = by_name[name]
        size = target_map.block_size
        # (physical start byte, physical end byte, path, logical start byte), by start.
        self._extents = sorted(
            (physical * size, (physical + count) * size, path, logical * size)
            for path, blocks in target_map.files.items()
            for logical, physical, count in blocks.extents
        )
        self._starts = [extent[0] for extent in self._extents]
        self._machines = self._read_machines(target)

    @property
    def paired(self) -> int:
        return len(self._pairs)

    def cuts(self) -> list[int]:
        """Every target offset where a file extent begins or ends, sorted."""
        return sorted({offset for extent in self._extents for offset in extent[:2]})

    def _read_machines(self, target: Path) -> dict[str, Filter]:
        """The branch filter of each paired ELF file of a known machine, from its header."""
        machines: dict[str, Filter] = {}
        size = self._target_map.block_size
        fd = os.open(target, os.O_RDONLY)
        try:
            for path in self._pairs:
                blocks = self._target_map.files[path]
                if not blocks.extents or blocks.extents[0][0] != 0 or blocks.size < 20:
                    continue
                header = os.pread(fd, 20, blocks.extents[0][1] * size)
                if header[:4] == _ELF_MAGIC and header[5] == 1:  # little-endian
                    machine = _ELF_MACHINES.get(int.from_bytes(header[18:20], "little"))
                    if machine is not None:
                        machines[path] = machine
        finally:
            os.close(fd)
        return machines

    def locate(self, offset: int, length: int) -> FilePiece | None:
        """Where target piece [offset, +length) lies: None unless in one paired file."""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index < 0:
            return None
        start, end, path, logical = self._extents[index]
        if offset + length > end or path not in self._pairs:
            return None
        return FilePiece(path, logical + (offset - start), length)

    def window(self, path: str, first: int, end: int) -> FileWindow | None:
        """The window for the new file's bytes [first, end) (pieces located in `path`), None
        unless its old version has bytes to diff against in at most MAX_WINDOW_EXTENTS."""
        old = self._source_map.files[self._pairs[path]]
        new_size = self._target_map.files[path].size
        size = self._source_map.block_size
        old_bytes = _allocated_end(old) * size
        if not old_bytes or not new_size:
            return None
        middle = (first + end) // 2 * old.size // new_size
        span = min(MAX_FILE_WINDOW, end - first + WINDOW_MARGIN, old_bytes)
        start = min(max(0, middle - span // 2), old_bytes - span) // size * size
        extents = _source_ranges(old, start, min(old_bytes, start + span), size)
        if (
            not extents
            or len(extents) > MAX_WINDOW_EXTENTS
            or any(begin + size > self._source_size for begin, size in extents)
        ):
            return None
        contiguous = sum(length for _, length in extents) == min(old_bytes, start + span) - start
        return FileWindow(
            path,
            tuple(extents),
            start,
            self._machines.get(path, Filter.RAW) if contiguous else Filter.RAW,
        )


def _allocated_end(blocks: FileBlocks) -> int:
    """The logical block after the file's last allocated one."""
    return max((logical + count for logical, _, count in blocks.extents), default=0)


def _source_ranges(blocks: FileBlocks, first: int, end: int, size: int) -> list[tuple[int, int]]:
    """The source image byte ranges holding the file's bytes [first, end); holes skipped."""
    ranges: list[tuple[int, int]] = []
    for logical, physical, count in blocks.extents:
        low = max(first, logical * size)
        high = min(end, (logical + count) * size)
        if low >= high:
            continue
        source = physical * size + (low - logical * size)
        if ranges and ranges[-1][0] + ranges[-1][1] == source:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + high - low)
        else:
            ranges.append((source, high - low))
    return ranges


def _file_map(image: Path) -> FileMap | None:
    """The file map of an ext4 or erofs image; None for any other content."""
    if ext4_block_size(image) is not None:
        return ext4_file_map(image)
    if erofs_block_size(image) is not None:
        return erofs_file_map(image)
    return None


def file_pairing(source: Path, source_size: int, target: Path) -> FilePairing | None:
    """The pairing of two ext4 or erofs images (either kind on either side), None when
    either is neither or cannot be read (the delta is then made without it: file awareness
    only makes it smaller)."""
    if not source_size:
        return None
    try:
        source_map = _file_map(source)
        target_map = _file_map(target) if source_map is not None else None
    except AvobuildError:
        return None
    if source_map is None or target_map is None:
        return None
    return FilePairing(source_size, source_map, target, target_map)
