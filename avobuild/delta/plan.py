"""Planning a delta: which target blocks exist in the source, which are zero, which changed.

The approach is Android update_engine's, adapted to a stream applier:

1. Every full 4 KiB block of the source is hashed (sha256, first 16 bytes kept) into an
   index: digest -> first source block with it. 600 MB of source is ~150k entries, a few tens
   of MB of memory. The target's blocks are hashed in the same pass (both images are read once,
   on two threads: hashlib releases the GIL).
2. Target blocks are classified in order: all-zero -> ZERO; found in the source -> COPY,
   preferring the block after the previous copy's source block so extents stay long; the rest
   is CHANGED. Runs of equal kind coalesce into extents. A single copied block between
   changed blocks is usually a coincidence (a common block of padding), so it is folded into
   the changed run, keeping changed runs whole for the diff.
3. Each changed run is cut into pieces of at most `extent_size` bytes, and each piece gets the
   source region most likely to hold its old version as a dictionary. Filesystems keep
   files in allocation order, so a changed file sits between unchanged neighbours that are
   COPY extents, and its old version sits between the same neighbours in the source: the
   piece is mapped linearly from the target gap into the source gap, and the dictionary is a
   window around the mapped position: 2 × the piece + 64 KiB, at most `dictionary_size`
   (small changes sit close to the mapped position, and every window byte costs dictionary
   loading when encoding and applying). Without usable neighbours the piece maps to the
   same offset.

Only digests and extents are held in memory, never image data beyond one read buffer.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from avobuild.delta.stream import BLOCK_SIZE, MAX_EXTENT
from avobuild.errors import BundleError

DIGEST_SIZE = 16
DEFAULT_EXTENT_SIZE = 1 << 20
DEFAULT_DICTIONARY_SIZE = 2 << 20
SMALL_WINDOW_MARGIN = 64 << 10
_READ_SIZE = 4 << 20
_ZERO_BLOCK = bytes(BLOCK_SIZE)


class ExtentKind(StrEnum):
    COPY = "copy"
    ZERO = "zero"
    CHANGED = "changed"


@dataclass(frozen=True)
class PlannedExtent:
    """A target range and where it comes from. CHANGED extents name their dictionary range
    (`source_length` 0: no source to diff against)."""

    kind: ExtentKind
    offset: int
    length: int
    source_offset: int = 0
    source_length: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


def block_digests(path: Path, size: int) -> bytes:
    """The 16-byte digests of every full block of the first `size` bytes, concatenated."""
    digests = bytearray()
    full_blocks = size // BLOCK_SIZE
    try:
        with path.open("rb") as handle:
            remaining = full_blocks * BLOCK_SIZE
            while remaining:
                data = handle.read(min(_READ_SIZE, remaining))
                if not data:
                    raise BundleError(f"{path}: shorter than {size} bytes")
                view = memoryview(data)
                for start in range(0, len(data), BLOCK_SIZE):
                    block = view[start : start + BLOCK_SIZE]
                    digests += hashlib.sha256(block).digest()[:DIGEST_SIZE]
                remaining -= len(data)
    except OSError as error:
        raise BundleError(f"{path}: cannot read: {error.strerror or error}") from None
    return bytes(digests)


_ZERO_DIGEST = hashlib.sha256(_ZERO_BLOCK).digest()[:DIGEST_SIZE]


def plan_delta(
    source: Path,
    source_size: int,
    target: Path,
    target_size: int,
    *,
    extent_size: int = DEFAULT_EXTENT_SIZE,
    dictionary_size: int = DEFAULT_DICTIONARY_SIZE,
) -> list[PlannedExtent]:
    """Extents tiling [0, target_size) in order (see the module docstring)."""
    return split_runs(
        plan_runs(source, source_size, target, target_size),
        source_size,
        extent_size=extent_size,
        dictionary_size=dictionary_size,
    )


def plan_runs(
    source: Path, source_size: int, target: Path, target_size: int
) -> list[PlannedExtent]:
    """Steps 1 and 2 of the module docstring: COPY, ZERO and whole CHANGED runs."""
    with ThreadPoolExecutor(2, thread_name_prefix="avobuild-hash") as pool:
        source_job = pool.submit(block_digests, source, source_size)
        target_job = pool.submit(block_digests, target, target_size)
        source_digests = source_job.result()
        target_digests = target_job.result()
    return _classify(source_digests, target_digests, target_size)


def split_runs(
    runs: list[PlannedExtent],
    source_size: int,
    *,
    extent_size: int = DEFAULT_EXTENT_SIZE,
    dictionary_size: int = DEFAULT_DICTIONARY_SIZE,
    cuts: list[int] | None = None,
) -> list[PlannedExtent]:
    """Step 3: CHANGED runs cut into pieces with their dictionaries; a piece also ends at
    every offset of `cuts` (sorted target offsets, for example where files begin and end)."""
    if not BLOCK_SIZE <= extent_size <= MAX_EXTENT or extent_size % BLOCK_SIZE:
        raise BundleError(f"extent size {extent_size}: expected a multiple of {BLOCK_SIZE}")
    if not 0 < dictionary_size <= MAX_EXTENT:
        raise BundleError(f"dictionary size {dictionary_size}: expected 1 to {MAX_EXTENT}")
    return _split_changed(runs, source_size, extent_size, dictionary_size, cuts or [])


def _classify(
    source_digests: bytes, target_digests: bytes, target_size: int
) -> list[PlannedExtent]:
    first: dict[bytes, int] = {}
    source_blocks = len(source_digests) // DIGEST_SIZE
    for index in range(source_blocks - 1, -1, -1):
        first[source_digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]] = index
    first.pop(_ZERO_DIGEST, None)

    # Runs of (kind, first target block, block count, first source block).
    kinds: list[ExtentKind] = []
    starts: list[int] = []
    counts: list[int] = []
    sources: list[int] = []
    previous_source = -2
    for index in range(len(target_digests) // DIGEST_SIZE):
        digest = target_digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
        source_block = -1
        if digest == _ZERO_DIGEST:
            kind = ExtentKind.ZERO
        else:
            following = previous_source + 1
            if (
                0 <= following < source_blocks
                and source_digests[following * DIGEST_SIZE : (following + 1) * DIGEST_SIZE]
                == digest
            ):
                source_block = following
            else:
                source_block = first.get(digest, -1)
            kind = ExtentKind.COPY if source_block >= 0 else ExtentKind.CHANGED
        if (
            kinds
            and kinds[-1] is kind
            and (kind is not ExtentKind.COPY or source_block == previous_source + 1)
        ):
            counts[-1] += 1
        else:
            kinds.append(kind)
            starts.append(index)
            counts.append(1)
            sources.append(source_block)
        previous_source = source_block if kind is ExtentKind.COPY else -2

    extents = [
        PlannedExtent(
            kind,
            start * BLOCK_SIZE,
            count * BLOCK_SIZE,
            source_block * BLOCK_SIZE if kind is ExtentKind.COPY else 0,
        )
        for kind, start, count, source_block in zip(kinds, starts, counts, sources, strict=True)
    ]
    tail = target_size % BLOCK_SIZE
    if tail:
        extents.append(PlannedExtent(ExtentKind.CHANGED, target_size - tail, tail))
    return _fold(extents)


def _fold(extents: list[PlannedExtent]) -> list[PlannedExtent]:
    """Fold lone copied blocks between changed runs into them; merge adjacent changed runs."""
    folded: list[PlannedExtent] = []
    for position, extent in enumerate(extents):
        if (
            extent.kind is ExtentKind.COPY
            and extent.length == BLOCK_SIZE
            and 0 < position < len(extents) - 1
            and extents[position - 1].kind is ExtentKind.CHANGED
            and extents[position + 1].kind is ExtentKind.CHANGED
        ):
            extent = PlannedExtent(ExtentKind.CHANGED, extent.offset, extent.length)
        if folded and folded[-1].kind is ExtentKind.CHANGED and extent.kind is ExtentKind.CHANGED:
            previous = folded.pop()
            extent = PlannedExtent(
                ExtentKind.CHANGED, previous.offset, previous.length + extent.length
            )
        folded.append(extent)
    return folded


def _split_changed(
    extents: list[PlannedExtent],
    source_size: int,
    extent_size: int,
    dictionary_size: int,
    cuts: list[int],
) -> list[PlannedExtent]:
    before_of, after_of = _neighbour_copies(extents)
    planned: list[PlannedExtent] = []
    for position, extent in enumerate(extents):
        if extent.kind is not ExtentKind.CHANGED:
            planned.append(extent)
            continue
        gap_start, gap_length = _source_gap(
            extent, before_of[position], after_of[position], source_size
        )
        inner = cuts[
            bisect.bisect_right(cuts, extent.offset) : bisect.bisect_left(cuts, extent.end)
        ]
        for piece_start, piece_end in itertools.pairwise([extent.offset, *inner, extent.end]):
            for offset in range(piece_start, piece_end, extent_size):
                length = min(extent_size, piece_end - offset)
                planned.append(
                    _with_dictionary(
                        extent, offset, length, gap_start, gap_length, source_size, dictionary_size
                    )
                )
    return planned


def _neighbour_copies(
    extents: list[PlannedExtent],
) -> tuple[list[PlannedExtent | None], list[PlannedExtent | None]]:
    """For each extent, the nearest COPY extent of at least two blocks before and after it
    (one pass each way, so planning stays linear in the number of extents)."""
    before: list[PlannedExtent | None] = []
    nearest: PlannedExtent | None = None
    for extent in extents:
        before.append(nearest)
        if extent.kind is ExtentKind.COPY and extent.length >= 2 * BLOCK_SIZE:
            nearest = extent
    after: list[PlannedExtent | None] = [None] * len(extents)
    nearest = None
    for position in range(len(extents) - 1, -1, -1):
        after[position] = nearest
        extent = extents[position]
        if extent.kind is ExtentKind.COPY and extent.length >= 2 * BLOCK_SIZE:
            nearest = extent
    return before, after


def _source_gap(
    extent: PlannedExtent,
    before: PlannedExtent | None,
    after: PlannedExtent | None,
    source_size: int,
) -> tuple[int, int]:
    """The source range that the changed target range most likely replaced."""
    if before is not None and after is not None:
        # Unchanged bytes between the neighbours and this run shift along with them.
        start = before.source_offset + (extent.offset - before.offset)
        end = after.source_offset - (after.offset - extent.end)
        if 0 <= start < end <= source_size and end - start <= 4 * extent.length + (4 << 20):
            return start, end - start
    if before is not None:
        shift = before.source_offset - before.offset
    elif after is not None:
        shift = after.source_offset - after.offset
    else:
        shift = 0
    start = min(max(0, extent.offset + shift), source_size)
    end = min(max(start, extent.end + shift), source_size)
    return start, end - start


def _with_dictionary(
    extent: PlannedExtent,
    offset: int,
    length: int,
    gap_start: int,
    gap_length: int,
    source_size: int,
    dictionary_size: int,
) -> PlannedExtent:
    if source_size == 0:
        return PlannedExtent(ExtentKind.CHANGED, offset, length)
    # The piece's middle, mapped linearly from the changed target run into the source gap.
    middle = offset + length // 2 - extent.offset
    mapped = gap_start + middle * gap_length // extent.length if gap_length > 0 else gap_start
    # Small changes (metadata blocks, short files) sit close to where the mapping puts them;
    # a window much larger than the extent only costs dictionary loading on both ends.
    window = min(dictionary_size, source_size, 2 * length + SMALL_WINDOW_MARGIN)
    start = min(max(0, mapped - window // 2), source_size - window)
    return PlannedExtent(ExtentKind.CHANGED, offset, length, start, window)
