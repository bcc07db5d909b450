"""GPT writer and reader, checked against util-linux (sfdisk, fdisk) and by hand-decoding bytes."""

from __future__ import annotations

import io
import itertools
import random
import re
import struct
import subprocess
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avobuild.disk.gpt import (
    GptPartition,
    GptTable,
    derive_guid,
    first_usable_lba,
    last_usable_lba,
    read_gpt,
    write_gpt,
)
from avobuild.errors import BuildError, InstallError
from avobuild.model.guids import (
    GPT_ATTRIBUTES,
    GPT_TYPES,
    MBR_EXTENDED,
    MBR_TYPES,
    resolve_attribute,
    resolve_mbr_type,
    resolve_type_guid,
    type_name,
)

MIB = 1024 * 1024
DISK_GUID = uuid.UUID("6f1b5a0e-8d2c-4b7a-9e3f-0a1b2c3d4e5f")

# Name characters sfdisk prints unambiguously; the emoji is a UTF-16 surrogate pair.
NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_- .äß✓😀"
# Attribute bits sfdisk names: the three UEFI-defined bits and the type-specific bits 48-63.
SFDISK_ATTRIBUTE_BITS = [0, 1, 2, *range(48, 64)]
SFDISK_ATTRIBUTE_NAMES = {0: "RequiredPartition", 1: "NoBlockIOProtocol", 2: "LegacyBIOSBootable"}


# --- helpers -------------------------------------------------------------------------------


def make_image(
    path: Path,
    disk_size: int,
    sector_size: int,
    partitions: Sequence[GptPartition],
    disk_guid: uuid.UUID = DISK_GUID,
) -> Path:
    with path.open("wb") as image:
        image.truncate(disk_size)
    with path.open("r+b") as image:
        write_gpt(image, disk_size, sector_size, partitions, disk_guid)
    return path


def read_image(path: Path, sector_size: int = 512) -> GptTable:
    with path.open("rb") as image:
        return read_gpt(image, sector_size)


def random_name(rng: random.Random) -> str:
    while True:
        name = "".join(rng.choice(NAME_ALPHABET) for _ in range(rng.randint(1, 36)))
        if len(name.encode("utf-16-le")) <= 72 and name.strip() == name:
            return name


def random_layout(
    rng: random.Random, disk_size: int, sector_size: int, count: int, aligned: bool
) -> list[GptPartition]:
    """Up to `count` partitions in increasing LBA order, with random gaps, types and names."""
    granule = MIB // sector_size if aligned else 1
    first_usable = first_usable_lba(sector_size)
    last_usable = last_usable_lba(disk_size, sector_size)
    next_lba = -(-first_usable // granule) * granule
    free = last_usable - next_lba + 1
    average = max(granule, free // (count + 1))
    partitions: list[GptPartition] = []
    for index in range(count):
        start = next_lba + rng.randint(0, 2) * granule
        length = max(1, rng.randint(1, 2 * average // granule)) * granule
        if rng.random() < 0.1:
            length = rng.randint(1, 3 * granule)  # odd-sized partitions
        last = start + length - 1
        if index == count - 1 and rng.random() < 0.5:
            last = last_usable  # a partition that ends exactly at the last usable block
        if last > last_usable or start > last:
            break
        attributes = 0
        for bit in rng.sample(SFDISK_ATTRIBUTE_BITS, rng.randint(0, 3)):
            attributes |= 1 << bit
        partitions.append(
            GptPartition(
                name=random_name(rng),
                type_guid=rng.choice(list(GPT_TYPES.values())),
                unique_guid=derive_guid("test", str(index), str(rng.random())),
                first_lba=start,
                last_lba=last,
                attributes=attributes,
            )
        )
        next_lba = last + 1
    rng.shuffle(partitions)  # entry order need not follow LBA order
    return partitions


def _unescape_sfdisk(text: str) -> str:
    # sfdisk -d prints bytes outside printable ASCII as \xNN escapes of the UTF-8 encoding.
    raw = bytearray()
    position = 0
    while position < len(text):
        if text.startswith("\\x", position):
            raw.append(int(text[position + 2 : position + 4], 16))
            position += 4
        else:
            raw += text[position].encode()
            position += 1
    return raw.decode()


_SFDISK_FIELD = re.compile(r'(\w+)=\s*("(?:[^"\\]|\\.)*"|[^,]*)')


def sfdisk_dump(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    completed = subprocess.run(
        ["sfdisk", "-d", str(path)], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == "", completed.stderr
    header: dict[str, str] = {}
    entries: list[dict[str, str]] = []
    for line in completed.stdout.splitlines():
        if " : " in line:
            _, fields = line.split(" : ", 1)
            entry = {}
            for key, value in _SFDISK_FIELD.findall(fields):
                if value.startswith('"'):
                    value = _unescape_sfdisk(value[1:-1])
                entry[key] = value.strip()
            entries.append(entry)
        elif ": " in line:
            key, value = line.split(": ", 1)
            header[key] = value
    return header, entries


def sfdisk_attributes(text: str) -> int:
    bit_of_name = {name: bit for bit, name in SFDISK_ATTRIBUTE_NAMES.items()}
    attributes = 0
    for token in text.split():
        if token.startswith("GUID:"):
            for number in token.removeprefix("GUID:").split(","):
                attributes |= 1 << int(number)
        else:
            attributes |= 1 << bit_of_name[token]
    return attributes


def assert_sfdisk_verifies(path: Path) -> None:
    completed = subprocess.run(
        ["sfdisk", "-V", str(path)], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    # sfdisk quietly falls back to the backup table, saying so only on stderr.
    assert completed.stderr == ""
    assert "No errors detected." in completed.stdout


def assert_table_equal(
    table: GptTable, partitions: Sequence[GptPartition], disk_size: int, sector_size: int
) -> None:
    assert table.partitions == tuple(partitions)
    assert table.disk_guid == DISK_GUID
    assert table.sector_size == sector_size
    assert table.first_usable_lba == first_usable_lba(sector_size)
    assert table.last_usable_lba == last_usable_lba(disk_size, sector_size)


def small_partition(name: str, first: int, last: int, **kwargs: int) -> GptPartition:
    return GptPartition(
        name=name,
        type_guid=GPT_TYPES["linux-generic"],
        unique_guid=derive_guid("small", repr(name), str(first)),
        first_lba=first,
        last_lba=last,
        **kwargs,
    )


# --- the table as other tools see it -------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_sfdisk_reads_what_we_write(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    disk_size = rng.randint(16, 512) * MIB + rng.randint(0, 2047) * 512
    count = 128 if seed == 0 else rng.randint(1, 16)
    partitions = random_layout(rng, disk_size, 512, count, aligned=seed % 2 == 1)
    assert partitions
    image = make_image(tmp_path / "disk.img", disk_size, 512, partitions)

    header, entries = sfdisk_dump(image)
    assert header["label"] == "gpt"
    assert uuid.UUID(header["label-id"]) == DISK_GUID
    assert int(header["first-lba"]) == first_usable_lba(512)
    assert int(header["last-lba"]) == last_usable_lba(disk_size, 512)
    assert header["sector-size"] == "512"
    assert len(entries) == len(partitions)
    for entry, partition in zip(entries, partitions, strict=True):
        assert int(entry["start"]) == partition.first_lba
        assert int(entry["size"]) == partition.sectors
        assert uuid.UUID(entry["type"]) == partition.type_guid
        assert uuid.UUID(entry["uuid"]) == partition.unique_guid
        assert entry["name"] == partition.name
        assert sfdisk_attributes(entry.get("attrs", "")) == partition.attributes
    assert_sfdisk_verifies(image)
    assert_table_equal(read_image(image), partitions, disk_size, 512)


def test_4096_byte_sectors(tmp_path: Path) -> None:
    # sfdisk 2.38 has no --sector-size; fdisk -b reads a file with a given logical block size.
    rng = random.Random(4096)
    disk_size = 256 * MIB
    partitions = random_layout(rng, disk_size, 4096, 6, aligned=True)
    partitions = [
        GptPartition(p.name.replace(" ", "_"), p.type_guid, p.unique_guid, p.first_lba, p.last_lba)
        for p in partitions
    ]
    image = make_image(tmp_path / "disk.img", disk_size, 4096, partitions)

    completed = subprocess.run(
        ["fdisk", "-b", "4096", "-l", "-o", "Device,Start,End,Type-UUID,UUID,Name", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    lines = completed.stdout.splitlines()
    assert "Disklabel type: gpt" in lines
    assert f"Disk identifier: {str(DISK_GUID).upper()}" in lines
    assert "Units: sectors of 1 * 4096 = 4096 bytes" in lines
    rows = [line.split(maxsplit=5) for line in lines if line.startswith(str(image))]
    assert len(rows) == len(partitions)
    for row, partition in zip(rows, partitions, strict=True):
        _, start, end, type_guid, unique_guid, name = row
        assert (int(start), int(end)) == (partition.first_lba, partition.last_lba)
        assert uuid.UUID(type_guid) == partition.type_guid
        assert uuid.UUID(unique_guid) == partition.unique_guid
        assert name == partition.name

    table = read_image(image, 4096)
    assert_table_equal(table, partitions, disk_size, 4096)
    assert table.first_usable_lba == 6  # MBR, header, 16 KiB of entries in four blocks
    for partition in partitions:
        assert table.offset(partition) == partition.first_lba * 4096
        assert table.size(partition) == partition.sectors * 4096
    with pytest.raises(InstallError):
        read_image(image, 512)  # no table at the 512-byte positions


def test_reads_tables_sfdisk_writes(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as handle:
        handle.truncate(48 * MIB)
    script = (
        "label: gpt\n"
        "label-id: 0B0F1A6E-3C1D-4E55-8F00-1234567890AB\n"
        'start=2048, size=4096, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="boot"\n'
        'size=20000, type=B921B045-1DF0-41C3-AF44-4C6F280D3FAE, name="root a", attrs="GUID:60"\n'
        'type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="data"\n'
    )
    subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(image)],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )
    header, entries = sfdisk_dump(image)
    table = read_image(image)
    assert table.disk_guid == uuid.UUID(header["label-id"])
    assert table.first_usable_lba == int(header["first-lba"])
    assert table.last_usable_lba == int(header["last-lba"])
    assert [p.name for p in table.partitions] == ["boot", "root a", "data"]
    for entry, partition in zip(entries, table.partitions, strict=True):
        assert partition.first_lba == int(entry["start"])
        assert partition.sectors == int(entry["size"])
        assert partition.type_guid == uuid.UUID(entry["type"])
        assert partition.unique_guid == uuid.UUID(entry["uuid"])
        assert partition.attributes == sfdisk_attributes(entry.get("attrs", ""))
    root = table.find("root a")
    assert root is not None
    assert root.attributes == 1 << 60
    assert table.find("missing") is None


# --- the bytes, decoded independently ------------------------------------------------------


def _decode_header(block: bytes) -> dict[str, int | bytes]:
    names = [
        "signature",
        "revision",
        "header_size",
        "header_crc",
        "reserved",
        "my_lba",
        "alternate_lba",
        "first_usable",
        "last_usable",
        "disk_guid",
        "entries_lba",
        "entry_count",
        "entry_size",
        "entries_crc",
    ]
    return dict(zip(names, struct.unpack("<8sIIII4Q16sQIII", block[:92]), strict=True))


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_header_fields_and_crcs(tmp_path: Path, sector_size: int) -> None:
    disk_size = 40 * MIB
    partitions = [
        small_partition("one", first_usable_lba(sector_size), 100),
        small_partition("two", 200, last_usable_lba(disk_size, sector_size)),
    ]
    image = make_image(tmp_path / "disk.img", disk_size, sector_size, partitions)
    data = image.read_bytes()
    last_lba = disk_size // sector_size - 1
    entry_blocks = 16384 // sector_size

    primary = _decode_header(data[sector_size : 2 * sector_size])
    backup = _decode_header(data[last_lba * sector_size :])
    assert primary["signature"] == backup["signature"] == b"EFI PART"
    assert primary["revision"] == 0x00010000
    assert primary["header_size"] == 92
    assert (primary["my_lba"], primary["alternate_lba"]) == (1, last_lba)
    assert (backup["my_lba"], backup["alternate_lba"]) == (last_lba, 1)
    assert primary["entries_lba"] == 2
    assert backup["entries_lba"] == last_lba - entry_blocks
    assert primary["first_usable"] == 2 + entry_blocks
    assert primary["last_usable"] == last_lba - entry_blocks - 1
    assert primary["disk_guid"] == DISK_GUID.bytes_le
    assert (primary["entry_count"], primary["entry_size"]) == (128, 128)

    primary_entries = data[2 * sector_size : 2 * sector_size + 16384]
    backup_offset = int(backup["entries_lba"]) * sector_size
    assert data[backup_offset : backup_offset + 16384] == primary_entries
    assert primary["entries_crc"] == backup["entries_crc"] == zlib.crc32(primary_entries)
    for header_lba, header in ((1, primary), (last_lba, backup)):
        block = bytearray(data[header_lba * sector_size : header_lba * sector_size + 92])
        block[16:20] = bytes(4)
        assert header["header_crc"] == zlib.crc32(block)
        assert data[header_lba * sector_size + 92 : (header_lba + 1) * sector_size].count(0) == (
            sector_size - 92
        )

    first_entry = primary_entries[:128]
    assert first_entry[:16] == GPT_TYPES["linux-generic"].bytes_le
    assert struct.unpack_from("<QQ", first_entry, 32) == (first_usable_lba(sector_size), 100)
    assert first_entry[56:] == "one".encode("utf-16-le").ljust(72, b"\x00")
    assert primary_entries[256:] == bytes(16384 - 256)

    # Protective MBR, UEFI section 5.2.3.
    assert data[:446] == bytes(446)
    record = data[446:462]
    assert record[0] == 0x00
    assert record[1:4] == b"\x00\x02\x00"
    assert record[4] == 0xEE
    assert record[5:8] == b"\xff\xff\xff"
    assert struct.unpack_from("<II", record, 8) == (1, last_lba)
    assert data[462:510] == bytes(48)
    assert data[510:512] == b"\x55\xaa"
    assert data[512:sector_size] == bytes(sector_size - 512)


def test_protective_mbr_size_is_capped_on_huge_disks(tmp_path: Path) -> None:
    disk_size = 3 * 1024**4  # 3 TiB, sparse: beyond what 32-bit MBR sizes reach
    partition = small_partition("big", 2048, last_usable_lba(disk_size, 512))
    image = make_image(tmp_path / "disk.img", disk_size, 512, [partition])
    with image.open("rb") as handle:
        mbr = handle.read(512)
    assert struct.unpack_from("<I", mbr, 446 + 12)[0] == 0xFFFFFFFF
    assert_sfdisk_verifies(image)
    _, entries = sfdisk_dump(image)
    assert int(entries[0]["size"]) == partition.sectors
    assert read_image(image).partitions == (partition,)


# --- damaged tables ------------------------------------------------------------------------


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0x5A]))


@pytest.fixture
def layout_image(tmp_path: Path) -> tuple[Path, list[GptPartition]]:
    partitions = random_layout(random.Random(7), 32 * MIB, 512, 5, aligned=True)
    return make_image(tmp_path / "disk.img", 32 * MIB, 512, partitions), partitions


@pytest.mark.parametrize(
    "offset",
    [
        512,  # signature
        512 + 16,  # header CRC itself
        512 + 56,  # disk GUID, caught by the header CRC
        1024 + 57,  # a partition name in the entry array, caught by the entry CRC
        1024 + 127 * 128,  # the last (empty) entry
    ],
)
def test_damaged_primary_falls_back_to_backup(
    layout_image: tuple[Path, list[GptPartition]], offset: int
) -> None:
    image, partitions = layout_image
    _flip_byte(image, offset)
    table = read_image(image)
    assert table.from_backup
    assert_table_equal(table, partitions, 32 * MIB, 512)


def test_intact_primary_is_not_marked_as_backup(
    layout_image: tuple[Path, list[GptPartition]],
) -> None:
    image, partitions = layout_image
    _flip_byte(image, 32 * MIB - 512 + 8)  # damage only the backup
    table = read_image(image)
    assert not table.from_backup
    assert_table_equal(table, partitions, 32 * MIB, 512)


def test_both_copies_damaged(layout_image: tuple[Path, list[GptPartition]]) -> None:
    image, _ = layout_image
    _flip_byte(image, 512 + 56)
    _flip_byte(image, 32 * MIB - 512 + 56)
    with pytest.raises(InstallError) as caught:
        read_image(image)
    message = str(caught.value)
    assert "primary GPT header: CRC32" in message
    assert f"at byte offset {512 + 16}" in message
    assert f"at byte offset {32 * MIB - 512 + 16}" in message


def test_damaged_entry_arrays(layout_image: tuple[Path, list[GptPartition]]) -> None:
    image, _ = layout_image
    _flip_byte(image, 1024 + 40)
    _flip_byte(image, 32 * MIB - 512 - 16384 + 40)
    with pytest.raises(InstallError, match=r"GPT entry array: CRC32 .* at byte offset 1024;"):
        read_image(image)


@pytest.mark.parametrize("size", [0, 512, 1536, 64 * 1024])
def test_absent_table(tmp_path: Path, size: int) -> None:
    image = tmp_path / "blank.img"
    image.write_bytes(bytes(size))
    with pytest.raises(InstallError, match="byte offset"):
        read_image(image)


def test_disk_grown_after_flashing(layout_image: tuple[Path, list[GptPartition]]) -> None:
    # An image written to a bigger SD card: the backup is no longer in the last block, but the
    # primary is intact and says where its twin is.
    image, partitions = layout_image
    with image.open("r+b") as handle:
        handle.truncate(64 * MIB)
    table = read_image(image)
    assert not table.from_backup
    assert table.partitions == tuple(partitions)


def test_disk_truncated(layout_image: tuple[Path, list[GptPartition]]) -> None:
    image, _ = layout_image
    with image.open("r+b") as handle:
        handle.truncate(16 * MIB)
    with pytest.raises(InstallError, match="AlternateLBA"):
        read_image(image)


def test_unsupported_sector_size_on_read(layout_image: tuple[Path, list[GptPartition]]) -> None:
    image, _ = layout_image
    with pytest.raises(InstallError, match="sector size 2048"):
        read_image(image, 2048)


# --- what the writer refuses ---------------------------------------------------------------


def _write(tmp_path: Path, partitions: Sequence[GptPartition], **overrides: int) -> None:
    disk_size = overrides.get("disk_size", 8 * MIB)
    sector_size = overrides.get("sector_size", 512)
    file_size = overrides.get("file_size", disk_size)
    image = tmp_path / "refused.img"
    with image.open("wb") as handle:
        handle.truncate(file_size)
    with image.open("r+b") as handle:
        write_gpt(handle, disk_size, sector_size, partitions, DISK_GUID)


def test_refuses_overlap(tmp_path: Path) -> None:
    partitions = [small_partition("a", 2048, 4095), small_partition("b", 4095, 6000)]
    with pytest.raises(BuildError, match=r"GPT partition 'b'.*overlap partition 'a'"):
        _write(tmp_path, partitions)


@pytest.mark.parametrize(("first", "last"), [(33, 100), (34, 8 * 2048 - 33), (16000, 99999)])
def test_refuses_out_of_range(tmp_path: Path, first: int, last: int) -> None:
    with pytest.raises(BuildError, match=r"GPT partition 'p'.*outside the usable range 34\.\."):
        _write(tmp_path, [small_partition("p", first, last)])


def test_accepts_the_whole_usable_range(tmp_path: Path) -> None:
    _write(tmp_path, [small_partition("p", 34, 8 * 2048 - 34)])


def test_refuses_duplicate_unique_guid(tmp_path: Path) -> None:
    first = small_partition("a", 2048, 4095)
    twin = GptPartition("b", first.type_guid, first.unique_guid, 4096, 6000)
    with pytest.raises(BuildError, match=r"'b'.*also used by partition 'a'"):
        _write(tmp_path, [first, twin])


def test_refuses_more_than_128_partitions(tmp_path: Path) -> None:
    partitions = [small_partition(f"p{i}", 2048 + i, 2048 + i) for i in range(129)]
    with pytest.raises(BuildError, match="129 partitions"):
        _write(tmp_path, partitions)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sector_size": 1024}, "sector size 1024"),
        ({"disk_size": 8 * MIB + 100, "file_size": 8 * MIB + 100}, "not a multiple"),
        ({"disk_size": 16 * 1024, "file_size": 16 * 1024}, "too small"),
        ({"file_size": 4 * MIB}, "image is 4194304 bytes"),
    ],
)
def test_refuses_bad_geometry(tmp_path: Path, overrides: dict[str, int], message: str) -> None:
    with pytest.raises(BuildError, match=message):
        _write(tmp_path, [], **overrides)


def test_partition_validation() -> None:
    assert small_partition("x" * 36, 2048, 2048).name == "x" * 36
    assert small_partition("😀" * 18, 2048, 2048).name == "😀" * 18  # 36 code units
    with pytest.raises(BuildError, match="37 UTF-16 code units"):
        small_partition("x" * 37, 2048, 2048)
    with pytest.raises(BuildError, match="38 UTF-16 code units"):
        small_partition("😀" * 19, 2048, 2048)
    with pytest.raises(BuildError, match="NUL"):
        small_partition("a\x00b", 2048, 2048)
    with pytest.raises(BuildError, match="UTF-16"):
        small_partition("\udc80", 2048, 2048)
    with pytest.raises(BuildError, match=r"GPT partition 'p': LBA range 10\.\.9"):
        small_partition("p", 10, 9)
    with pytest.raises(BuildError, match="64 bits"):
        small_partition("p", 10, 10, attributes=1 << 64)
    with pytest.raises(BuildError, match="nil GUID"):
        GptPartition("p", uuid.UUID(int=0), uuid.uuid4(), 2048, 4095)


# --- GUIDs ---------------------------------------------------------------------------------


def test_derive_guid() -> None:
    guid = derive_guid("seed", "disk", "rootfs_a")
    assert guid == derive_guid("seed", "disk", "rootfs_a")
    assert guid.version == 4
    assert guid.variant == uuid.RFC_4122
    others = {
        derive_guid("seed", "disk", "rootfs_b"),
        derive_guid("other", "disk", "rootfs_a"),
        derive_guid("seed", "diskrootfs_a"),
        derive_guid("seed", "disk", "rootfs_a", ""),
        derive_guid("seed"),
    }
    assert guid not in others
    assert len(others) == 5
    with pytest.raises(ValueError, match="NUL"):
        derive_guid("seed\x00disk")


def _sfdisk_types(label: str) -> dict[str, str]:
    completed = subprocess.run(
        ["sfdisk", "--label", label, "--list-types"], capture_output=True, text=True, check=True
    )
    types: dict[str, str] = {}
    for line in completed.stdout.splitlines()[1:]:
        if line.strip():
            identifier, description = line.split(maxsplit=1)
            types[description.strip()] = identifier
    return types


def _expected_sfdisk_description(name: str) -> str:
    architectures = {
        "x86": "x86",
        "x86-64": "x86-64",
        "arm": "ARM",
        "arm64": "ARM-64",
        "riscv64": "RISC-V-64",
    }
    fixed = {
        "esp": "EFI System",
        "xbootldr": "Linux extended boot",
        "bios-boot": "BIOS boot",
        "home": "Linux home",
        "srv": "Linux server data",
        "var": "Linux variable data",
        "tmp": "Linux temporary data",
        "swap": "Linux swap",
        "linux-generic": "Linux filesystem",
        "linux-lvm": "Linux LVM",
        "linux-raid": "Linux RAID",
        "basic-data": "Microsoft basic data",
    }
    if name in fixed:
        return fixed[name]
    role, _, rest = name.partition("-")
    suffix = ""
    for ending, words in (("-verity-sig", " verity sign."), ("-verity", " verity")):
        if rest.endswith(ending):
            rest, suffix = rest.removesuffix(ending), words
            break
    prefix = {"root": "Linux root", "usr": "Linux /usr"}[role]
    return f"{prefix}{suffix} ({architectures[rest]})"


def test_type_guids_match_sfdisk() -> None:
    sfdisk_guids = {
        description: uuid.UUID(identifier)
        for description, identifier in _sfdisk_types("gpt").items()
    }
    for name, guid in GPT_TYPES.items():
        description = _expected_sfdisk_description(name)
        assert sfdisk_guids[description] == guid, (name, description)
        assert resolve_type_guid(name) == guid
        assert resolve_type_guid(name.upper()) == guid
        assert type_name(guid) == name
    assert len(set(GPT_TYPES.values())) == len(GPT_TYPES)


def test_mbr_types_match_sfdisk() -> None:
    expected = {
        "fat12": "FAT12",
        "fat16-small": "FAT16 <32M",
        "fat16-chs": "FAT16",
        "ntfs": "HPFS/NTFS/exFAT",
        "fat32-chs": "W95 FAT32",
        "fat32": "W95 FAT32 (LBA)",
        "fat32-lba": "W95 FAT32 (LBA)",
        "fat16": "W95 FAT16 (LBA)",
        "fat16-lba": "W95 FAT16 (LBA)",
        "linux-swap": "Linux swap / Solaris",
        "linux": "Linux",
        "linux-lvm": "Linux LVM",
        "non-fs-data": "Non-FS data",
        "xbootldr": "Linux extended boot",
        "esp": "EFI (FAT-12/16/32)",
        "ebbr-protective": "EBBR protective",
        "linux-raid": "Linux raid autodetect",
        "linux-generic": "Linux",
        "swap": "Linux swap / Solaris",
        "basic-data": "W95 FAT32 (LBA)",
    }
    sfdisk_ids = {
        description: int(identifier, 16) for description, identifier in _sfdisk_types("dos").items()
    }
    assert set(MBR_TYPES) == set(expected)
    for name, type_id in MBR_TYPES.items():
        assert sfdisk_ids[expected[name]] == type_id, name
        assert resolve_mbr_type(name.upper()) == type_id
    # The GPT spellings that MBR_TYPES accepts mean the same thing in both tables.
    shared = set(MBR_TYPES) & set(GPT_TYPES)
    assert shared == {
        "esp",
        "xbootldr",
        "linux-generic",
        "swap",
        "linux-lvm",
        "linux-raid",
        "basic-data",
    }
    assert sfdisk_ids["W95 Ext'd (LBA)"] == MBR_EXTENDED


def test_resolve_mbr_literals_and_refusals() -> None:
    assert resolve_mbr_type("0x83") == 0x83
    assert resolve_mbr_type("0xDA") == 0xDA
    assert resolve_mbr_type("0x7") == 0x07
    for reserved in ("0x00", "0x05", "0x0f", "0x85", "0xee"):
        with pytest.raises(ValueError, match="avobuild writes those itself"):
            resolve_mbr_type(reserved)
    for unknown in ("root-arm64", "0x100", "83", "ext4"):
        with pytest.raises(ValueError, match="unknown MBR partition type") as caught:
            resolve_mbr_type(unknown)
        assert "fat32-lba" in str(caught.value)


def test_gpt_attribute_names_match_sfdisk() -> None:
    """sfdisk names bits 0-2; the type-specific bits it prints as GUID:N."""
    names = {
        "required": "RequiredPartition",
        "no-block-io-protocol": "NoBlockIOProtocol",
        "legacy-bios-bootable": "LegacyBIOSBootable",
    }
    for name, bit in GPT_ATTRIBUTES.items():
        assert resolve_attribute(name) == bit
        assert SFDISK_ATTRIBUTE_NAMES.get(bit, f"GUID:{bit}") == names.get(name, f"GUID:{bit}")
    assert (GPT_ATTRIBUTES["read-only"], GPT_ATTRIBUTES["no-auto"]) == (60, 63)
    assert resolve_attribute(48) == 48
    for bad in (64, -1, "readonly", True):
        with pytest.raises(ValueError):
            resolve_attribute(bad)  # type: ignore[arg-type]


def test_resolve_literal_and_unknown_types() -> None:
    literal = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
    assert resolve_type_guid(literal) == GPT_TYPES["root-x86-64"]
    assert resolve_type_guid(literal.lower()) == GPT_TYPES["root-x86-64"]
    custom = resolve_type_guid("12345678-9abc-def0-1234-56789abcdef0")
    assert custom == uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    assert type_name(custom) is None
    with pytest.raises(ValueError, match="unknown partition type 'rootfs'") as caught:
        resolve_type_guid("rootfs")
    assert "root-arm64" in str(caught.value)
    assert "linux-generic" in str(caught.value)


# --- the reader never fails in any other way -----------------------------------------------

FUZZ_DISK_SIZE = 256 * 512


def _fuzz_base() -> bytes:
    image = io.BytesIO(bytes(FUZZ_DISK_SIZE))
    partitions = [
        small_partition("boot", 34, 60, attributes=1 << 63),
        small_partition("root_a", 61, 150),
        small_partition("root_b", 151, last_usable_lba(FUZZ_DISK_SIZE, 512)),
    ]
    write_gpt(image, FUZZ_DISK_SIZE, 512, partitions, DISK_GUID)
    return image.getvalue()


FUZZ_BASE = _fuzz_base()
# The regions worth mutating: MBR, primary header and entries, backup entries and header.
FUZZ_REGIONS = [(0, 2 * 512 + 4 * 128), (FUZZ_DISK_SIZE - 512 - 16384, FUZZ_DISK_SIZE)]


def _reseal(image: bytearray, header_lba: int) -> None:
    """Recompute the CRCs of a mutated header, so the checks behind the CRCs get exercised."""
    offset = header_lba * 512
    entries_lba, count, size = struct.unpack_from("<QII", image, offset + 72)
    if count * size <= 1024 * 1024 and entries_lba * 512 + count * size <= len(image):
        start = entries_lba * 512
        struct.pack_into("<I", image, offset + 88, zlib.crc32(image[start : start + count * size]))
    header_size = struct.unpack_from("<I", image, offset + 12)[0]
    if 92 <= header_size <= 512:
        struct.pack_into("<I", image, offset + 16, 0)
        crc = zlib.crc32(image[offset : offset + header_size])
        struct.pack_into("<I", image, offset + 16, crc)


def _check_read(data: bytes) -> None:
    try:
        table = read_gpt(io.BytesIO(data), 512)
    except InstallError:
        return
    last_lba = len(data) // 512 - 1
    assert 2 <= table.first_usable_lba <= table.last_usable_lba < last_lba
    spans = sorted((p.first_lba, p.last_lba) for p in table.partitions)
    for first, last in spans:
        assert table.first_usable_lba <= first <= last <= table.last_usable_lba
    for (_, before_last), (after_first, _) in itertools.pairwise(spans):
        assert before_last < after_first


@settings(max_examples=300)
@given(st.binary(max_size=8 * 512))
def test_reader_on_random_bytes(data: bytes) -> None:
    _check_read(data)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 1 << 20), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    reseal=st.sampled_from([None, 1, FUZZ_DISK_SIZE // 512 - 1]),
    length=st.sampled_from([FUZZ_DISK_SIZE, FUZZ_DISK_SIZE - 512, FUZZ_DISK_SIZE + 4096]),
)
def test_reader_on_mutated_tables(
    mutations: list[tuple[int, int, int]], reseal: int | None, length: int
) -> None:
    image = bytearray(FUZZ_BASE)
    for region, position, value in mutations:
        start, end = FUZZ_REGIONS[region]
        image[start + position % (end - start)] = value
    if reseal is not None:
        _reseal(image, reseal)
    _check_read(bytes(image[:length]).ljust(length, b"\x00"))


def test_reader_survives_resealed_header_fields() -> None:
    # Targeted: every header field set to extremes, CRCs fixed, primary and backup both.
    extremes = [0, 1, 2, 33, 34, 127, 128, 255, 256, 0xFFFFFFFF, (1 << 63), (1 << 64) - 1]
    fields = {24: "Q", 32: "Q", 40: "Q", 48: "Q", 72: "Q", 80: "I", 84: "I", 12: "I"}
    for header_lba in (1, FUZZ_DISK_SIZE // 512 - 1):
        for field_offset, code in fields.items():
            for value in extremes:
                if code == "I" and value > 0xFFFFFFFF:
                    continue
                image = bytearray(FUZZ_BASE)
                struct.pack_into("<" + code, image, header_lba * 512 + field_offset, value)
                _reseal(image, header_lba)
                _check_read(bytes(image))
