"""Block maps (`.bmap`, bmaptool format 2.0) so factory images flash in seconds, not minutes.

A bmap lists the block ranges of a sparse image that hold data, each with its sha256; bmaptool
writes only those ranges and verifies them. The file's own checksum (`BmapFileChecksum`) is the
sha256 of the whole XML with that field's value replaced by 64 zeros.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

BMAP_BLOCK_SIZE = 4096
_ZERO_CHECKSUM = "0" * 64


def mapped_ranges(path: Path, block_size: int = BMAP_BLOCK_SIZE) -> Iterator[tuple[int, int]]:
    """Inclusive block ranges that hold data, found with SEEK_DATA/SEEK_HOLE."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        fd = handle.fileno()
        position = 0
        pending: tuple[int, int] | None = None
        while position < size:
            try:
                data_start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            hole_start = os.lseek(fd, data_start, os.SEEK_HOLE)
            first = data_start // block_size
            last = (min(hole_start, size) - 1) // block_size
            if pending is not None and first <= pending[1] + 1:
                pending = (pending[0], max(pending[1], last))
            else:
                if pending is not None:
                    yield pending
                pending = (first, last)
            position = hole_start
        if pending is not None:
            yield pending


def _range_checksum(handle: os.PathLike[str] | int, first: int, last: int, size: int) -> str:
    digest = hashlib.sha256()
    start = first * BMAP_BLOCK_SIZE
    end = min((last + 1) * BMAP_BLOCK_SIZE, size)
    fd = handle if isinstance(handle, int) else os.open(handle, os.O_RDONLY)
    while start < end:
        chunk = os.pread(fd, min(1 << 20, end - start), start)
        digest.update(chunk)
        start += len(chunk)
    return digest.hexdigest()


def render_bmap(image: Path) -> bytes:
    """The bmap XML for `image`, with per-range sha256 and the file checksum filled in."""
    size = image.stat().st_size
    blocks = -(-size // BMAP_BLOCK_SIZE)
    ranges = list(mapped_ranges(image))
    mapped = sum(last - first + 1 for first, last in ranges)
    fd = os.open(image, os.O_RDONLY)
    try:
        range_lines = []
        for first, last in ranges:
            checksum = _range_checksum(fd, first, last, size)
            span = f"{first}-{last}" if last != first else f"{first}"
            range_lines.append(f'        <Range chksum="{checksum}"> {span} </Range>\n')
    finally:
        os.close(fd)
    text = (
        '<?xml version="1.0" ?>\n'
        '<bmap version="2.0">\n'
        f"    <ImageSize> {size} </ImageSize>\n"
        f"    <BlockSize> {BMAP_BLOCK_SIZE} </BlockSize>\n"
        f"    <BlocksCount> {blocks} </BlocksCount>\n"
        f"    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n"
        "    <ChecksumType> sha256 </ChecksumType>\n"
        f"    <BmapFileChecksum> {_ZERO_CHECKSUM} </BmapFileChecksum>\n"
        "    <BlockMap>\n" + "".join(range_lines) + "    </BlockMap>\n"
        "</bmap>\n"
    )
    file_checksum = hashlib.sha256(text.encode()).hexdigest()
    return text.replace(_ZERO_CHECKSUM, file_checksum, 1).encode()
