"""Master Boot Record partition tables: primary records, the extended partition and its EBRs.

Sector 0 of the disk (the layout every PC partitioner agrees on, documented by the UEFI
Specification 2.10, section 5.2.1 "Legacy Master Boot Record"):

- bytes 0-439: boot code (left alone by the writer: a raw region or boot loader may own it);
- bytes 440-443: the 32-bit disk signature (Linux shows it as the "disk identifier" and
  builds PARTUUIDs from it: `SSSSSSSS-NN`), 444-445 zero;
- bytes 446-509: four 16-byte partition records: status (0x80 = bootable), start CHS, type,
  end CHS, first LBA (32 bits), number of sectors (32 bits), little-endian;
- bytes 510-511: 0x55 0xAA.

More than four partitions take one primary record for an extended partition (type 0x0F) that
contains a chain of Extended Boot Records (EBRs). Each EBR is one sector laid out like the MBR
with two used records: the first describes its logical partition, its start relative to the
EBR itself; the second links to the next EBR, its start relative to the start of the extended
partition and its size covering that EBR and its logical partition. Logical partitions are
numbered 5, 6, ... in chain order, as Linux numbers them.

CHS fields are computed for 255 heads and 63 sectors per track (what fdisk and genimage use
for disk images) and saturate at cylinder 1023; firmware of the last 25 years reads the LBAs.

The reader bounds everything it follows (records inside the disk, every EBR inside the
extended partition, at most `MAX_LOGICAL` logical partitions, no EBR twice), because it runs
on disks whose contents are not trusted.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from avobuild.errors import BuildError, InstallError

SECTOR_SIZES = (512, 4096)
BOOT_CODE_SIZE = 440
SIGNATURE_OFFSET = 440
RECORDS_OFFSET = 446
RECORD_SIZE = 16
BOOT_SIGNATURE = b"\x55\xaa"
BOOTABLE = 0x80
EXTENDED_TYPES = (0x05, 0x0F, 0x85)
GPT_PROTECTIVE = 0xEE
MAX_LOGICAL = 128
_LBA_LIMIT = 1 << 32
_HEADS = 255
_SECTORS_PER_TRACK = 63
# status, start CHS, type, end CHS, first LBA, sectors
_RECORD = struct.Struct("<B3sB3sII")


@dataclass(frozen=True)
class MbrRecord:
    """One 16-byte partition record, with the LBA it is relative to already applied."""

    type_id: int
    first_lba: int
    sectors: int
    bootable: bool = False


@dataclass(frozen=True)
class MbrPartition:
    """A primary (number 1-4) or logical (5 and up) partition. LBAs are absolute."""

    number: int
    type_id: int
    first_lba: int
    sectors: int
    bootable: bool = False
    # Logical partitions: the sector of the EBR that describes this partition.
    ebr_lba: int | None = None

    @property
    def last_lba(self) -> int:
        return self.first_lba + self.sectors - 1

    @property
    def logical(self) -> bool:
        return self.number > 4


@dataclass(frozen=True)
class ExtendedPartition:
    """The primary record (slot 1-4) that contains the logical partitions and their EBRs."""

    slot: int
    first_lba: int
    sectors: int

    @property
    def last_lba(self) -> int:
        return self.first_lba + self.sectors - 1


@dataclass(frozen=True)
class MbrTable:
    disk_signature: int
    sector_size: int
    partitions: tuple[MbrPartition, ...]  # primaries by slot, then logicals in chain order
    extended: ExtendedPartition | None = None

    def find(self, number: int) -> MbrPartition | None:
        return next((part for part in self.partitions if part.number == number), None)

    def offset(self, partition: MbrPartition) -> int:
        return partition.first_lba * self.sector_size

    def size(self, partition: MbrPartition) -> int:
        return partition.sectors * self.sector_size


def derive_disk_signature(seed: str) -> int:
    """A non-zero 32-bit disk signature that depends only on the seed (0 means "none")."""
    digest = hashlib.sha256(f"{seed}\x00mbr-disk-signature".encode(errors="surrogatepass"))
    value = int.from_bytes(digest.digest()[:4], "little")
    return value or 1


def partuuid(disk_signature: int, number: int) -> str:
    """The PARTUUID Linux gives partition `number` of an MBR disk (`root=PARTUUID=...`)."""
    return f"{disk_signature:08x}-{number:02x}"


# --- writing -------------------------------------------------------------------------------


def _chs(lba: int) -> bytes:
    cylinder = lba // (_HEADS * _SECTORS_PER_TRACK)
    if cylinder > 1023:
        return b"\xfe\xff\xff"
    head = (lba // _SECTORS_PER_TRACK) % _HEADS
    sector = lba % _SECTORS_PER_TRACK + 1
    return bytes((head, sector | ((cylinder >> 2) & 0xC0), cylinder & 0xFF))


def pack_record(record: MbrRecord, relative_to: int = 0) -> bytes:
    """One partition record; `relative_to` is subtracted from the stored LBA (EBR records).

    The CHS fields describe the absolute position, as fdisk writes them.
    """
    stored = record.first_lba - relative_to
    if not 0 <= stored < _LBA_LIMIT or not 0 < record.sectors < _LBA_LIMIT:
        raise BuildError(
            f"MBR: a partition at LBA {record.first_lba} of {record.sectors} sectors does not "
            "fit the 32-bit fields of a partition record"
        )
    return _RECORD.pack(
        BOOTABLE if record.bootable else 0,
        _chs(record.first_lba),
        record.type_id,
        _chs(record.first_lba + record.sectors - 1),
        stored,
        record.sectors,
    )


def pack_boot_sector(
    records: Sequence[MbrRecord | None],
    disk_signature: int | None,
    boot_code: bytes = b"",
    *,
    relative_to: int = 0,
) -> bytes:
    """512 bytes: boot code, signature, up to four records (None leaves a slot empty), 55AA.

    No layout checks: the hybrid ISO writer needs records that overlap (the classic isohybrid
    partition 1 covers the whole medium from LBA 0). `write_mbr` checks a layout first.
    """
    if len(records) > 4:
        raise BuildError(f"MBR: {len(records)} records do not fit in the 4 slots of a sector")
    if len(boot_code) > BOOT_CODE_SIZE:
        raise BuildError(f"MBR: boot code is {len(boot_code)} bytes, at most 440 fit")
    sector = bytearray(512)
    sector[: len(boot_code)] = boot_code
    if disk_signature is not None:
        if not 0 <= disk_signature < _LBA_LIMIT:
            raise BuildError(f"MBR: disk signature {disk_signature:#x} does not fit in 32 bits")
        struct.pack_into("<IH", sector, SIGNATURE_OFFSET, disk_signature, 0)
    for slot, record in enumerate(records):
        if record is not None:
            offset = RECORDS_OFFSET + slot * RECORD_SIZE
            sector[offset : offset + RECORD_SIZE] = pack_record(record, relative_to)
    sector[510:512] = BOOT_SIGNATURE
    return bytes(sector)


def write_mbr(f: BinaryIO, disk_size: int, table: MbrTable) -> None:
    """Write the partition records of sector 0 and every EBR of `table` into `f`.

    Bytes 0-439 of sector 0 (boot code) are not written; bytes 440-511 and each EBR sector
    are. `f` must already be `disk_size` bytes long.
    """
    sector_size = table.sector_size
    _check_table(f, disk_size, table)
    primaries: list[MbrRecord | None] = [None] * 4
    for part in table.partitions:
        if not part.logical:
            primaries[part.number - 1] = MbrRecord(
                part.type_id, part.first_lba, part.sectors, part.bootable
            )
    logicals = [part for part in table.partitions if part.logical]
    extended = table.extended
    if extended is not None:
        primaries[extended.slot - 1] = MbrRecord(
            EXTENDED_TYPES[1], extended.first_lba, extended.sectors
        )
    # Only bytes 440-511 of sector 0: the boot code before them belongs to a boot loader.
    f.seek(SIGNATURE_OFFSET)
    f.write(pack_boot_sector(primaries, table.disk_signature)[SIGNATURE_OFFSET:])
    for index, part in enumerate(logicals):
        assert part.ebr_lba is not None and extended is not None
        records: list[MbrRecord | None] = [
            MbrRecord(part.type_id, part.first_lba, part.sectors, part.bootable)
        ]
        if index + 1 < len(logicals):
            following = logicals[index + 1]
            assert following.ebr_lba is not None
            # The link is relative to the extended partition, its size covers the next EBR
            # and its partition.
            link = MbrRecord(
                EXTENDED_TYPES[1],
                following.ebr_lba,
                following.last_lba - following.ebr_lba + 1,
            )
            ebr = bytearray(pack_boot_sector(records, None, relative_to=part.ebr_lba))
            offset = RECORDS_OFFSET + RECORD_SIZE
            ebr[offset : offset + RECORD_SIZE] = pack_record(link, extended.first_lba)
        else:
            ebr = bytearray(pack_boot_sector(records, None, relative_to=part.ebr_lba))
        f.seek(part.ebr_lba * sector_size)
        f.write(bytes(ebr).ljust(sector_size, b"\0"))
    f.flush()


def _check_table(f: BinaryIO, disk_size: int, table: MbrTable) -> None:
    sector_size = table.sector_size
    if sector_size not in SECTOR_SIZES:
        raise BuildError(f"MBR: sector size {sector_size} is not supported, expected 512 or 4096")
    if disk_size % sector_size:
        raise BuildError(f"MBR: disk size {disk_size} is not a multiple of {sector_size}")
    actual = f.seek(0, io.SEEK_END)
    if actual != disk_size:
        raise BuildError(f"MBR: image is {actual} bytes, the table is for {disk_size} bytes")
    disk_sectors = disk_size // sector_size
    numbers = [part.number for part in table.partitions]
    if len(set(numbers)) != len(numbers):
        raise BuildError(f"MBR: partition numbers {numbers} repeat")
    logicals = [part for part in table.partitions if part.logical]
    extended = table.extended
    if logicals and extended is None:
        raise BuildError("MBR: logical partitions need an extended partition")
    used_slots = {part.number for part in table.partitions if not part.logical}
    if any(number < 1 for number in used_slots):
        raise BuildError(f"MBR: primary partition numbers must be 1-4, got {sorted(used_slots)}")
    if extended is not None:
        if not 1 <= extended.slot <= 4 or extended.slot in used_slots:
            raise BuildError(f"MBR: extended partition slot {extended.slot} is not a free slot")
        if [part.number for part in logicals] != list(range(5, 5 + len(logicals))):
            raise BuildError("MBR: logical partitions must be numbered 5, 6, ... in chain order")
    spans: list[tuple[int, int, str]] = []
    for part in table.partitions:
        where = f"MBR partition {part.number}"
        if part.first_lba < 1 or part.last_lba >= disk_sectors or part.sectors < 1:
            raise BuildError(
                f"{where}: LBAs {part.first_lba}..{part.last_lba} are outside 1..{disk_sectors - 1}"
            )
        spans.append((part.first_lba, part.last_lba, where))
        if part.logical:
            assert extended is not None
            if part.ebr_lba is None or not (
                extended.first_lba <= part.ebr_lba < part.first_lba
                and part.last_lba <= extended.last_lba
            ):
                raise BuildError(
                    f"{where}: its EBR (LBA {part.ebr_lba}) and LBAs {part.first_lba}.."
                    f"{part.last_lba} must lie in that order inside the extended partition "
                    f"({extended.first_lba}..{extended.last_lba})"
                )
            spans.append((part.ebr_lba, part.ebr_lba, f"the EBR of {where}"))
    if extended is not None:
        if logicals and logicals[0].ebr_lba != extended.first_lba:
            raise BuildError(
                "MBR: the first EBR must be the first sector of the extended partition"
            )
        if extended.last_lba >= disk_sectors:
            raise BuildError(f"MBR: the extended partition ends past the disk ({disk_sectors})")
        for part in table.partitions:
            if (
                not part.logical
                and part.first_lba <= extended.last_lba
                and (part.last_lba >= extended.first_lba)
            ):
                raise BuildError(f"MBR partition {part.number} overlaps the extended partition")
    for before, after in itertools.pairwise(sorted(spans)):
        if after[0] <= before[1]:
            raise BuildError(
                f"{after[2]} (LBAs {after[0]}..{after[1]}) overlaps {before[2]} "
                f"({before[0]}..{before[1]})"
            )


# --- reading -------------------------------------------------------------------------------


def has_boot_signature(sector: bytes) -> bool:
    return len(sector) >= 512 and sector[510:512] == BOOT_SIGNATURE


def _unpack_records(sector: bytes) -> list[tuple[int, int, int, int]]:
    """(status, type, first LBA, sectors) of the four records."""
    records = []
    for slot in range(4):
        status, _chs_start, type_id, _chs_end, first, sectors = _RECORD.unpack_from(
            sector, RECORDS_OFFSET + slot * RECORD_SIZE
        )
        records.append((status, type_id, first, sectors))
    return records


def read_mbr(f: BinaryIO, sector_size: int = 512) -> MbrTable:
    """Read the MBR partition table on `f`, following the EBR chain of an extended partition.

    Raises `InstallError` naming the fault and its byte offset; a GPT protective MBR is
    refused (read the GPT instead).
    """
    if sector_size not in SECTOR_SIZES:
        raise InstallError(f"MBR: sector size {sector_size} is not supported, expected 512 or 4096")
    disk_size = f.seek(0, io.SEEK_END)
    disk_sectors = disk_size // sector_size
    f.seek(0)
    sector = f.read(512)
    if not has_boot_signature(sector):
        raise InstallError("MBR: no 55 AA boot signature at byte offset 510")
    (signature,) = struct.unpack_from("<I", sector, SIGNATURE_OFFSET)
    partitions: list[MbrPartition] = []
    extended: ExtendedPartition | None = None
    for slot, (status, type_id, first, sectors) in enumerate(_unpack_records(sector), start=1):
        record_offset = RECORDS_OFFSET + (slot - 1) * RECORD_SIZE
        if type_id == 0 or sectors == 0:
            continue
        if type_id == GPT_PROTECTIVE:
            raise InstallError(
                f"MBR: record {slot} at byte offset {record_offset} is a GPT protective "
                "partition (type 0xee): this disk has a GPT"
            )
        if status not in (0, BOOTABLE):
            raise InstallError(
                f"MBR: record {slot} has status {status:#04x} at byte offset {record_offset}, "
                "expected 0x00 or 0x80"
            )
        if first == 0 or first + sectors > disk_sectors:
            raise InstallError(
                f"MBR: record {slot} at byte offset {record_offset} covers LBAs {first}.."
                f"{first + sectors - 1}, outside this {disk_sectors}-sector disk"
            )
        if type_id in EXTENDED_TYPES:
            if extended is not None:
                raise InstallError(
                    f"MBR: record {slot} at byte offset {record_offset} is a second extended "
                    "partition"
                )
            extended = ExtendedPartition(slot, first, sectors)
            continue
        partitions.append(MbrPartition(slot, type_id, first, sectors, status == BOOTABLE))
    if extended is not None:
        partitions.extend(_read_logicals(f, sector_size, extended))
    _check_no_overlap(partitions, extended)
    return MbrTable(signature, sector_size, tuple(partitions), extended)


def _read_logicals(
    f: BinaryIO, sector_size: int, extended: ExtendedPartition
) -> list[MbrPartition]:
    logicals: list[MbrPartition] = []
    ebr_lba = extended.first_lba
    seen: set[int] = set()
    while True:
        offset = ebr_lba * sector_size
        if ebr_lba in seen or len(logicals) >= MAX_LOGICAL:
            raise InstallError(
                f"MBR: the EBR chain loops or exceeds {MAX_LOGICAL} logical partitions at byte "
                f"offset {offset}"
            )
        seen.add(ebr_lba)
        f.seek(offset)
        sector = f.read(512)
        if not has_boot_signature(sector):
            raise InstallError(f"MBR: the EBR at byte offset {offset} has no 55 AA signature")
        records = _unpack_records(sector)
        status, type_id, first, sectors = records[0]
        number = 5 + len(logicals)
        if type_id == 0 or sectors == 0:
            # An empty first EBR: an extended partition without logical partitions.
            if logicals or records[1][1] != 0:
                raise InstallError(f"MBR: the EBR at byte offset {offset} describes no partition")
            return logicals
        absolute = ebr_lba + first
        if first == 0 or absolute + sectors - 1 > extended.last_lba:
            raise InstallError(
                f"MBR: logical partition {number} (EBR at byte offset {offset}) covers LBAs "
                f"{absolute}..{absolute + sectors - 1}, outside the extended partition "
                f"{extended.first_lba}..{extended.last_lba}"
            )
        logicals.append(
            MbrPartition(number, type_id, absolute, sectors, status == BOOTABLE, ebr_lba)
        )
        _link_status, link_type, link_first, _link_sectors = records[1]
        if link_type == 0:
            return logicals
        if link_type not in EXTENDED_TYPES:
            raise InstallError(
                f"MBR: the EBR at byte offset {offset} links with type {link_type:#04x}, "
                "expected an extended type"
            )
        ebr_lba = extended.first_lba + link_first
        if not extended.first_lba < ebr_lba <= extended.last_lba:
            raise InstallError(
                f"MBR: the EBR at byte offset {offset} links to LBA {ebr_lba}, outside the "
                f"extended partition {extended.first_lba}..{extended.last_lba}"
            )


def _check_no_overlap(partitions: list[MbrPartition], extended: ExtendedPartition | None) -> None:
    spans = [(part.first_lba, part.last_lba, f"partition {part.number}") for part in partitions]
    spans += [(p.ebr_lba, p.ebr_lba, f"the EBR of {p.number}") for p in partitions if p.ebr_lba]
    if extended is not None:
        for part in partitions:
            if (
                not part.logical
                and part.first_lba <= extended.last_lba
                and (part.last_lba >= extended.first_lba)
            ):
                raise InstallError(f"MBR: partition {part.number} overlaps the extended partition")
    for before, after in itertools.pairwise(sorted(spans)):
        if after[0] <= before[1]:
            raise InstallError(
                f"MBR: {after[2]} (LBAs {after[0]}..{after[1]}) overlaps {before[2]} "
                f"({before[0]}..{before[1]})"
            )
