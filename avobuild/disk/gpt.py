"""GUID Partition Table writer and reader (UEFI Specification 2.10, chapter 5).

Layout on a disk of N logical blocks (LBAs) with the usual 128 entries of 128 bytes:

- LBA 0: protective MBR (section 5.2.3) with a single partition record of type 0xEE that
  covers the disk from LBA 1, its size capped at 0xFFFFFFFF blocks, so MBR-only tools see
  the disk as in use rather than empty.
- LBA 1: primary GPT header (section 5.3.2), little-endian, 92 bytes, rest of block zero.
- LBA 2...: primary partition entry array (section 5.3.3), entry_count * 128 bytes.
- FirstUsableLBA ... LastUsableLBA: partitions.
- After LastUsableLBA: the backup entry array, then the backup header in LBA N-1.

Both headers carry a CRC32 of themselves (computed with the CRC field zeroed) and of the entry
array; each names its own location (MyLBA) and its twin's (AlternateLBA). GUIDs are stored in
the mixed-endian EFI_GUID layout, which is `uuid.UUID.bytes_le`.

The reader checks the primary header first and falls back to the backup in the last block
(section 5.3.2: "If the primary GPT is corrupt, software must check the last LBA of the device
to see if it has a valid GPT Header"). It bounds every size it reads before acting on it,
because it runs on target disks whose contents are not trusted.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from avobuild.errors import BuildError, InstallError

SECTOR_SIZES = (512, 4096)
ENTRY_COUNT = 128
ENTRY_SIZE = 128
NAME_CODE_UNITS = 36
# Largest entry array the reader accepts: 16 KiB is the norm, 1 MiB is generous.
MAX_ENTRY_ARRAY_BYTES = 1024 * 1024

HEADER_SIGNATURE = b"EFI PART"
HEADER_REVISION = 0x00010000
HEADER_SIZE = 92
# Signature, revision, header size, header CRC32, reserved, MyLBA, AlternateLBA,
# FirstUsableLBA, LastUsableLBA, DiskGUID, PartitionEntryLBA, NumberOfPartitionEntries,
# SizeOfPartitionEntry, PartitionEntryArrayCRC32.
_HEADER = struct.Struct("<8sIIII4Q16sQIII")
# PartitionTypeGUID, UniquePartitionGUID, StartingLBA, EndingLBA, Attributes, PartitionName.
_ENTRY = struct.Struct("<16s16sQQQ72s")
_HEADER_CRC_OFFSET = 16

_PROTECTIVE_TYPE = 0xEE
# Start CHS of LBA 1 is head 0, sector 2, cylinder 0. The end CHS is the "cannot be
# represented" marker 0xFFFFFF, as written by util-linux and gdisk: CHS geometry means
# nothing for the images we build.
_PROTECTIVE_RECORD = struct.Struct("<B3sB3sII")
_MBR_RECORD_OFFSET = 446
_MBR_SIGNATURE_OFFSET = 510
_MBR_SIGNATURE = b"\x55\xaa"

_UINT64_LIMIT = 1 << 64


@dataclass(frozen=True)
class GptPartition:
    """One used partition entry. LBAs are in logical blocks of the table's sector size."""

    name: str
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int  # inclusive
    attributes: int = 0

    def __post_init__(self) -> None:
        where = f"GPT partition {self.name!r}"
        if "\x00" in self.name:
            raise BuildError(f"{where}: name contains a NUL character")
        try:
            encoded = self.name.encode("utf-16-le")
        except UnicodeEncodeError as error:
            raise BuildError(f"{where}: name cannot be stored as UTF-16: {error}") from None
        if len(encoded) > NAME_CODE_UNITS * 2:
            raise BuildError(
                f"{where}: name is {len(encoded) // 2} UTF-16 code units long, "
                f"a GPT entry holds at most {NAME_CODE_UNITS}"
            )
        if self.type_guid.int == 0:
            raise BuildError(f"{where}: type GUID is the nil GUID, which marks an unused entry")
        if not 0 <= self.first_lba <= self.last_lba < _UINT64_LIMIT:
            raise BuildError(
                f"{where}: LBA range {self.first_lba}..{self.last_lba} is empty or out of range"
            )
        if not 0 <= self.attributes < _UINT64_LIMIT:
            raise BuildError(f"{where}: attributes {self.attributes:#x} do not fit in 64 bits")

    @property
    def sectors(self) -> int:
        """Length in logical blocks."""
        return self.last_lba - self.first_lba + 1


@dataclass(frozen=True)
class GptTable:
    """A partition table as read from a disk."""

    disk_guid: uuid.UUID
    sector_size: int
    first_usable_lba: int
    last_usable_lba: int
    partitions: tuple[GptPartition, ...]  # in entry order, empty entries skipped
    # True when the primary header or entries were damaged and this came from the backup.
    from_backup: bool = False

    def find(self, name: str) -> GptPartition | None:
        """The first partition with this GPT name, or None."""
        for partition in self.partitions:
            if partition.name == name:
                return partition
        return None

    def offset(self, partition: GptPartition) -> int:
        """Byte offset of the partition from the start of the disk."""
        return partition.first_lba * self.sector_size

    def size(self, partition: GptPartition) -> int:
        """Size of the partition in bytes."""
        return partition.sectors * self.sector_size


def _blocks_for(byte_count: int, sector_size: int) -> int:
    return -(-byte_count // sector_size)


def first_usable_lba(sector_size: int, entry_count: int = ENTRY_COUNT) -> int:
    """First LBA after the protective MBR, the primary header and the primary entry array."""
    return 2 + _blocks_for(entry_count * ENTRY_SIZE, sector_size)


def last_usable_lba(disk_size: int, sector_size: int, entry_count: int = ENTRY_COUNT) -> int:
    """Last LBA before the backup entry array and the backup header at the end of the disk."""
    return disk_size // sector_size - 2 - _blocks_for(entry_count * ENTRY_SIZE, sector_size)


def derive_guid(seed: str, *parts: str) -> uuid.UUID:
    """A GUID that depends only on its inputs, so rebuilding an image gives the same table.

    The first 16 bytes of SHA-256 over the NUL-joined inputs, with the version (4) and
    variant (RFC 9562) bits set so the result is indistinguishable from a random GUID.
    """
    for value in (seed, *parts):
        if "\x00" in value:
            # A NUL inside an input would let ("a\0b",) and ("a", "b") collide.
            raise ValueError(f"derive_guid: input {value!r} contains a NUL character")
    digest = hashlib.sha256("\x00".join((seed, *parts)).encode(errors="surrogatepass")).digest()
    return uuid.UUID(bytes=digest[:16], version=4)


# --- writing -------------------------------------------------------------------------------


def write_gpt(
    f: BinaryIO,
    disk_size: int,
    sector_size: int,
    partitions: Sequence[GptPartition],
    disk_guid: uuid.UUID,
) -> None:
    """Write a protective MBR, primary and backup GPT for `partitions` into `f`.

    Only the table blocks are written; `f` must already be exactly `disk_size` bytes long.
    """
    _check_geometry(f, disk_size, sector_size)
    first_usable = first_usable_lba(sector_size)
    last_usable = last_usable_lba(disk_size, sector_size)
    _check_partitions(partitions, first_usable, last_usable, sector_size)

    last_lba = disk_size // sector_size - 1
    backup_entries_lba = last_usable + 1
    entries = _pack_entries(partitions)
    entries_crc = zlib.crc32(entries)
    entries_padded = entries.ljust(_blocks_for(ENTRY_COUNT * ENTRY_SIZE, sector_size) * sector_size)

    def header(my_lba: int, alternate_lba: int, entries_lba: int) -> bytes:
        return _pack_header(
            my_lba=my_lba,
            alternate_lba=alternate_lba,
            first_usable=first_usable,
            last_usable=last_usable,
            disk_guid=disk_guid,
            entries_lba=entries_lba,
            entries_crc=entries_crc,
        ).ljust(sector_size, b"\x00")

    blocks = (
        (0, _protective_mbr(last_lba).ljust(sector_size, b"\x00")),
        (1, header(1, last_lba, 2)),
        (2, entries_padded),
        (backup_entries_lba, entries_padded),
        (last_lba, header(last_lba, 1, backup_entries_lba)),
    )
    for lba, data in blocks:
        f.seek(lba * sector_size)
        f.write(data)
    f.flush()


def _check_geometry(f: BinaryIO, disk_size: int, sector_size: int) -> None:
    if sector_size not in SECTOR_SIZES:
        raise BuildError(f"GPT: sector size {sector_size} is not supported, expected 512 or 4096")
    if disk_size % sector_size:
        raise BuildError(
            f"GPT: disk size {disk_size} is not a multiple of the sector size {sector_size}"
        )
    if last_usable_lba(disk_size, sector_size) < first_usable_lba(sector_size):
        raise BuildError(f"GPT: disk size {disk_size} is too small to hold a partition table")
    actual = f.seek(0, io.SEEK_END)
    if actual != disk_size:
        # The backup header must sit in the last block of the disk; a table written for
        # another size would be read as corrupt.
        raise BuildError(f"GPT: image is {actual} bytes, the table is for {disk_size} bytes")


def _check_partitions(
    partitions: Sequence[GptPartition], first_usable: int, last_usable: int, sector_size: int
) -> None:
    if len(partitions) > ENTRY_COUNT:
        raise BuildError(
            f"GPT: {len(partitions)} partitions do not fit in {ENTRY_COUNT} table entries"
        )
    owner_of_guid: dict[uuid.UUID, GptPartition] = {}
    for partition in partitions:
        where = f"GPT partition {partition.name!r}"
        if partition.first_lba < first_usable or partition.last_lba > last_usable:
            raise BuildError(
                f"{where}: LBAs {partition.first_lba}..{partition.last_lba} are outside the "
                f"usable range {first_usable}..{last_usable} ({sector_size}-byte sectors)"
            )
        owner = owner_of_guid.setdefault(partition.unique_guid, partition)
        if owner is not partition:
            raise BuildError(
                f"{where}: unique GUID {partition.unique_guid} is also used by partition "
                f"{owner.name!r}"
            )
    by_start = sorted(partitions, key=lambda partition: partition.first_lba)
    for before, after in itertools.pairwise(by_start):
        if after.first_lba <= before.last_lba:
            raise BuildError(
                f"GPT partition {after.name!r}: LBAs {after.first_lba}..{after.last_lba} "
                f"overlap partition {before.name!r} ({before.first_lba}..{before.last_lba})"
            )


def _pack_entries(partitions: Sequence[GptPartition]) -> bytes:
    array = bytearray(ENTRY_COUNT * ENTRY_SIZE)
    for index, partition in enumerate(partitions):
        _ENTRY.pack_into(
            array,
            index * ENTRY_SIZE,
            partition.type_guid.bytes_le,
            partition.unique_guid.bytes_le,
            partition.first_lba,
            partition.last_lba,
            partition.attributes,
            partition.name.encode("utf-16-le"),
        )
    return bytes(array)


def _pack_header(
    *,
    my_lba: int,
    alternate_lba: int,
    first_usable: int,
    last_usable: int,
    disk_guid: uuid.UUID,
    entries_lba: int,
    entries_crc: int,
) -> bytes:
    fields = (
        HEADER_SIGNATURE,
        HEADER_REVISION,
        HEADER_SIZE,
        0,  # header CRC32, computed over the header with this field zero
        0,  # reserved
        my_lba,
        alternate_lba,
        first_usable,
        last_usable,
        disk_guid.bytes_le,
        entries_lba,
        ENTRY_COUNT,
        ENTRY_SIZE,
        entries_crc,
    )
    unsigned = _HEADER.pack(*fields)
    return _HEADER.pack(*fields[:3], zlib.crc32(unsigned), *fields[4:])


def _protective_mbr(last_lba: int) -> bytes:
    mbr = bytearray(512)
    _PROTECTIVE_RECORD.pack_into(
        mbr,
        _MBR_RECORD_OFFSET,
        0x00,  # not bootable
        b"\x00\x02\x00",
        _PROTECTIVE_TYPE,
        b"\xff\xff\xff",
        1,
        min(last_lba, 0xFFFFFFFF),
    )
    mbr[_MBR_SIGNATURE_OFFSET:] = _MBR_SIGNATURE
    return bytes(mbr)


# --- reading -------------------------------------------------------------------------------


class _Corrupt(Exception):
    """A header or its entry array is unusable: what, detail and the byte offset at fault."""

    def __init__(self, what: str, detail: str, offset: int) -> None:
        super().__init__(f"{what}: {detail} at byte offset {offset}")


@dataclass(frozen=True)
class _Header:
    first_usable: int
    last_usable: int
    disk_guid: uuid.UUID
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int


def read_gpt(f: BinaryIO, sector_size: int = 512) -> GptTable:
    """Read and validate the GPT on `f`, falling back to the backup if the primary is damaged.

    Raises `InstallError` naming the first fault and its byte offset when neither copy is valid.
    """
    if sector_size not in SECTOR_SIZES:
        raise InstallError(f"GPT: sector size {sector_size} is not supported, expected 512 or 4096")
    disk_size = f.seek(0, io.SEEK_END)
    last_lba = disk_size // sector_size - 1
    if last_lba < 2:
        raise InstallError(
            f"GPT header: missing, the disk is only {disk_size} bytes and ends "
            f"at byte offset {disk_size}"
        )
    try:
        return _read_copy(f, sector_size, last_lba, header_lba=1)
    except _Corrupt as primary_fault:
        try:
            return _read_copy(f, sector_size, last_lba, header_lba=last_lba)
        except _Corrupt as backup_fault:
            raise InstallError(
                f"no valid GPT: primary {primary_fault}; backup {backup_fault}"
            ) from None


def _read_copy(f: BinaryIO, sector_size: int, last_lba: int, header_lba: int) -> GptTable:
    header = _read_header(f, sector_size, last_lba, header_lba)
    entries = _read_entries(f, sector_size, header)
    return GptTable(
        disk_guid=header.disk_guid,
        sector_size=sector_size,
        first_usable_lba=header.first_usable,
        last_usable_lba=header.last_usable,
        partitions=entries,
        from_backup=header_lba != 1,
    )


def _read_exact(f: BinaryIO, offset: int, length: int, what: str) -> bytes:
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise _Corrupt(what, f"short read, {len(data)} of {length} bytes", offset)
    return data


def _read_header(f: BinaryIO, sector_size: int, last_lba: int, header_lba: int) -> _Header:
    what = "GPT header"
    offset = header_lba * sector_size
    block = _read_exact(f, offset, sector_size, what)
    (
        signature,
        _revision,
        header_size,
        stored_crc,
        _reserved,
        my_lba,
        alternate_lba,
        first_usable,
        last_usable,
        disk_guid,
        entries_lba,
        entry_count,
        entry_size,
        entries_crc,
    ) = _HEADER.unpack_from(block)

    if signature != HEADER_SIGNATURE:
        raise _Corrupt(what, f"signature is {signature!r}, expected {HEADER_SIGNATURE!r}", offset)
    if not HEADER_SIZE <= header_size <= sector_size:
        raise _Corrupt(
            what, f"header size {header_size} is outside {HEADER_SIZE}..{sector_size}", offset + 12
        )
    unsigned = bytearray(block[:header_size])
    unsigned[_HEADER_CRC_OFFSET : _HEADER_CRC_OFFSET + 4] = bytes(4)
    computed_crc = zlib.crc32(unsigned)
    if computed_crc != stored_crc:
        raise _Corrupt(
            what,
            f"CRC32 is {stored_crc:#010x}, the header's contents give {computed_crc:#010x}",
            offset + _HEADER_CRC_OFFSET,
        )
    if my_lba != header_lba:
        raise _Corrupt(
            what, f"MyLBA is {my_lba}, but the header is in LBA {header_lba}", offset + 24
        )
    if alternate_lba == my_lba or alternate_lba > last_lba:
        raise _Corrupt(
            what,
            f"AlternateLBA {alternate_lba} is not another block of this {last_lba + 1}-block disk",
            offset + 32,
        )
    if not 2 <= first_usable <= last_usable < last_lba:
        raise _Corrupt(
            what,
            f"usable LBAs {first_usable}..{last_usable} do not fit between the headers "
            f"of this {last_lba + 1}-block disk",
            offset + 40,
        )
    if entry_size < ENTRY_SIZE or entry_size & (entry_size - 1):
        raise _Corrupt(
            what, f"entry size {entry_size} is not 128 times a power of two", offset + 84
        )
    array_bytes = entry_count * entry_size
    if array_bytes > MAX_ENTRY_ARRAY_BYTES:
        raise _Corrupt(
            what,
            f"{entry_count} entries of {entry_size} bytes exceed the "
            f"{MAX_ENTRY_ARRAY_BYTES}-byte limit",
            offset + 80,
        )
    array_end_lba = entries_lba + _blocks_for(array_bytes, sector_size)
    # Section 5.3.1: the primary array lies between the primary header and FirstUsableLBA,
    # the backup array between LastUsableLBA and the backup header.
    if header_lba == 1:
        array_fits = entries_lba >= 2 and array_end_lba <= first_usable
    else:
        array_fits = entries_lba > last_usable and array_end_lba <= header_lba
    if not array_fits:
        raise _Corrupt(
            what,
            f"entry array at LBAs {entries_lba}..{array_end_lba - 1} overlaps the header or "
            f"the usable LBAs {first_usable}..{last_usable}",
            offset + 72,
        )
    return _Header(
        first_usable=first_usable,
        last_usable=last_usable,
        disk_guid=uuid.UUID(bytes_le=disk_guid),
        entries_lba=entries_lba,
        entry_count=entry_count,
        entry_size=entry_size,
        entries_crc=entries_crc,
    )


def _read_entries(f: BinaryIO, sector_size: int, header: _Header) -> tuple[GptPartition, ...]:
    what = "GPT entry array"
    array_offset = header.entries_lba * sector_size
    array = _read_exact(f, array_offset, header.entry_count * header.entry_size, what)
    computed_crc = zlib.crc32(array)
    if computed_crc != header.entries_crc:
        raise _Corrupt(
            what,
            f"CRC32 is {computed_crc:#010x}, the header records {header.entries_crc:#010x}",
            array_offset,
        )
    partitions: list[GptPartition] = []
    entry_offsets: list[int] = []
    for index in range(header.entry_count):
        entry_offset = index * header.entry_size
        type_guid, unique_guid, first, last, attributes, raw_name = _ENTRY.unpack_from(
            array, entry_offset
        )
        if type_guid == bytes(16):
            continue
        where = f"GPT entry {index + 1}"
        if not header.first_usable <= first <= last <= header.last_usable:
            raise _Corrupt(
                where,
                f"LBAs {first}..{last} are empty or outside the usable range "
                f"{header.first_usable}..{header.last_usable}",
                array_offset + entry_offset + 32,
            )
        partitions.append(
            GptPartition(
                name=_decode_name(raw_name),
                type_guid=uuid.UUID(bytes_le=type_guid),
                unique_guid=uuid.UUID(bytes_le=unique_guid),
                first_lba=first,
                last_lba=last,
                attributes=attributes,
            )
        )
        entry_offsets.append(array_offset + entry_offset)
    _check_no_overlap(partitions, entry_offsets)
    return tuple(partitions)


def _decode_name(raw_name: bytes) -> str:
    code_units = [raw_name[i : i + 2] for i in range(0, len(raw_name), 2)]
    if b"\x00\x00" in code_units:
        code_units = code_units[: code_units.index(b"\x00\x00")]
    # A name is only a label; an unpaired surrogate should not make the disk unreadable.
    return b"".join(code_units).decode("utf-16-le", errors="replace")


def _check_no_overlap(partitions: list[GptPartition], entry_offsets: list[int]) -> None:
    # Writing into one of two overlapping partitions would silently corrupt the other.
    by_start = sorted(zip(partitions, entry_offsets, strict=True), key=lambda p: p[0].first_lba)
    for (before, _), (after, after_offset) in itertools.pairwise(by_start):
        if after.first_lba <= before.last_lba:
            raise _Corrupt(
                "GPT entry array",
                f"partition {after.name!r} (LBAs {after.first_lba}..{after.last_lba}) "
                f"overlaps {before.name!r} ({before.first_lba}..{before.last_lba})",
                after_offset + 32,
            )
