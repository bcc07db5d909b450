"""Partition type identifiers by name.

GPT type GUIDs come from the UAPI Group's Discoverable Partitions Specification (DPS,
https://uapi-group.org/specifications/specs/discoverable_partitions_specification/) where it
defines them, so systemd-gpt-auto-generator, systemd-repart and friends recognise what we build;
the EFI system partition is defined by the UEFI specification (section 5.3.3) and the few
non-DPS types (BIOS boot, LVM, RAID, Microsoft basic data) are the ones every partitioner uses.

Names follow the DPS pattern `<role>-<architecture>[-verity[-sig]]` in the spelling
systemd-repart uses for its `Type=` setting, so a recipe author can copy them from either.
"""

from __future__ import annotations

import re
import uuid

GPT_TYPES: dict[str, uuid.UUID] = {
    name: uuid.UUID(value)
    for name, value in (
        # Boot.
        ("esp", "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"),
        ("xbootldr", "bc13c2ff-59e6-4262-a352-b275fd6f7172"),
        ("bios-boot", "21686148-6449-6e6f-744e-656564454649"),
        # Root file systems, their dm-verity hash data and verity signatures.
        ("root-x86", "44479540-f297-41b2-9af7-d131d5f0458a"),
        ("root-x86-verity", "d13c5d3b-b5d1-422a-b29f-9454fdc89d76"),
        ("root-x86-verity-sig", "5996fc05-109c-48de-808b-23fa0830b676"),
        ("root-x86-64", "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
        ("root-x86-64-verity", "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5"),
        ("root-x86-64-verity-sig", "41092b05-9fc8-4523-994f-2def0408b176"),
        ("root-arm", "69dad710-2ce4-4e3c-b16c-21a1d49abed3"),
        ("root-arm-verity", "7386cdf2-203c-47a9-a498-f2ecce45a2d6"),
        ("root-arm-verity-sig", "42b0455f-eb11-491d-98d3-56145ba9d037"),
        ("root-arm64", "b921b045-1df0-41c3-af44-4c6f280d3fae"),
        ("root-arm64-verity", "df3300ce-d69f-4c92-978c-9bfb0f38d820"),
        ("root-arm64-verity-sig", "6db69de6-29f4-4758-a7a5-962190f00ce3"),
        ("root-riscv64", "72ec70a6-cf74-40e6-bd49-4bda08e8f224"),
        ("root-riscv64-verity", "b6ed5582-440b-4209-b8da-5ff7c419ea3d"),
        ("root-riscv64-verity-sig", "efe0f087-ea8d-4469-821a-4c2a96a8386a"),
        # /usr file systems, their dm-verity hash data and verity signatures.
        ("usr-x86", "75250d76-8cc6-458e-bd66-bd47cc81a812"),
        ("usr-x86-verity", "8f461b0d-14ee-4e81-9aa9-049b6fb97abd"),
        ("usr-x86-verity-sig", "974a71c0-de41-43c3-be5d-5c5ccd1ad2c0"),
        ("usr-x86-64", "8484680c-9521-48c6-9c11-b0720656f69e"),
        ("usr-x86-64-verity", "77ff5f63-e7b6-4633-acf4-1565b864c0e6"),
        ("usr-x86-64-verity-sig", "e7bb33fb-06cf-4e81-8273-e543b413e2e2"),
        ("usr-arm", "7d0359a3-02b3-4f0a-865c-654403e70625"),
        ("usr-arm-verity", "c215d751-7bcd-4649-be90-6627490a4c05"),
        ("usr-arm-verity-sig", "d7ff812f-37d1-4902-a810-d76ba57b975a"),
        ("usr-arm64", "b0e01050-ee5f-4390-949a-9101b17104e9"),
        ("usr-arm64-verity", "6e11a4e7-fbca-4ded-b9e9-e1a512bb664e"),
        ("usr-arm64-verity-sig", "c23ce4ff-44bd-4b00-b2d4-b41b3419e02a"),
        ("usr-riscv64", "beaec34b-8442-439b-a40b-984381ed097d"),
        ("usr-riscv64-verity", "8f1056be-9b05-47c4-81d6-be53128e5b54"),
        ("usr-riscv64-verity-sig", "d2f9000a-7a18-453f-b5cd-4d32f77a7b32"),
        # Data partitions mounted by role.
        ("home", "933ac7e1-2eb4-4f13-b844-0e14e2aef915"),
        ("srv", "3b8f8425-20e0-4f3b-907f-1a25a76f98e8"),
        ("var", "4d21b016-b534-45c2-a9fb-5c16e091fd2d"),
        ("tmp", "7ec6f557-3bc5-4aca-b293-16ef5df639d1"),
        ("swap", "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"),
        # Generic and container partitions outside the DPS.
        ("linux-generic", "0fc63daf-8483-4772-8e79-3d69d8477de4"),
        ("linux-lvm", "e6d6d379-f507-44c2-a23c-238f2a3df928"),
        ("linux-raid", "a19d880f-05fc-4d3b-a006-743f0f84911e"),
        ("basic-data", "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"),
    )
}

# MBR system IDs (the type byte of a partition record) by name. Names say what sits in the
# partition and, for FAT, how it is addressed: images are addressed by LBA, so plain "fat16"
# and "fat32" mean the LBA types, as Raspberry Pi and genimage layouts use them. The GPT names
# that have an MBR equivalent ("linux-generic", "swap", "basic-data", ...) are accepted too, so
# a layout can switch tables without renaming its types. MBR has no per-architecture root or
# verity types: those names are deliberately absent and refused rather than guessed.
MBR_TYPES: dict[str, int] = {
    "fat12": 0x01,
    "fat16-small": 0x04,  # FAT16 below 32 MiB, CHS
    "fat16-chs": 0x06,
    "ntfs": 0x07,  # also exFAT and HPFS
    "fat32-chs": 0x0B,
    "fat32": 0x0C,
    "fat32-lba": 0x0C,
    "fat16": 0x0E,
    "fat16-lba": 0x0E,
    "linux-swap": 0x82,
    "linux": 0x83,
    "linux-lvm": 0x8E,
    "non-fs-data": 0xDA,  # firmware, boot loader blobs, raw data
    "xbootldr": 0xEA,  # Boot Loader Specification: "Linux extended boot"
    "esp": 0xEF,
    "ebbr-protective": 0xF8,  # Arm EBBR: protects firmware at a fixed offset
    "linux-raid": 0xFD,
    # The GPT spellings of the same types.
    "linux-generic": 0x83,
    "swap": 0x82,
    "basic-data": 0x0C,  # FAT32 with LBA addressing
}
# The type byte avobuild writes for the extended partition that holds logical partitions
# ("W95 Ext'd (LBA)", as genimage writes it).
MBR_EXTENDED = 0x0F
# Type bytes a layout may not give a partition: the container types of an extended partition
# (avobuild writes those itself) and the GPT protective type.
MBR_RESERVED = {
    0x00: "an unused entry",
    0x05: "an extended partition",
    0x0F: "an extended partition",
    0x85: "an extended partition",
    0xEE: "a GPT protective partition",
}

# GPT partition attribute bits by name (UEFI 2.10 table 5.8 for bits 0-2; the Discoverable
# Partitions Specification for 59, 60 and 63; bit 62 is the "hidden" bit of Microsoft basic
# data partitions that genimage also writes).
GPT_ATTRIBUTES: dict[str, int] = {
    "required": 0,
    "no-block-io-protocol": 1,
    "legacy-bios-bootable": 2,
    "growfs": 59,
    "read-only": 60,
    "hidden": 62,
    "no-auto": 63,
}

_NAMES_BY_GUID: dict[uuid.UUID, str] = {guid: name for name, guid in GPT_TYPES.items()}


def resolve_type_guid(value: str) -> uuid.UUID:
    """Turn a type name ("root-arm64") or a literal GUID string (any case) into a UUID."""
    known = GPT_TYPES.get(value.strip().lower())
    if known is not None:
        return known
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        names = ", ".join(sorted(GPT_TYPES))
        raise ValueError(
            f"unknown partition type {value!r}: expected a GUID like "
            f"'0fc63daf-8483-4772-8e79-3d69d8477de4' or one of: {names}"
        ) from None


def type_name(guid: uuid.UUID) -> str | None:
    """The name of a known partition type GUID, or None when it is not in the table."""
    return _NAMES_BY_GUID.get(guid)


def resolve_mbr_type(value: str) -> int:
    """Turn a type name ("fat32-lba") or a literal byte ("0x0c") into an MBR type byte."""
    text = value.strip().lower()
    known = MBR_TYPES.get(text)
    if known is not None:
        return known
    if re.fullmatch(r"0x[0-9a-f]{1,2}", text):
        byte = int(text, 16)
        reserved = MBR_RESERVED.get(byte)
        if reserved is not None:
            raise ValueError(f"type {value!r} marks {reserved}; avobuild writes those itself")
        return byte
    names = ", ".join(sorted(MBR_TYPES))
    raise ValueError(
        f"unknown MBR partition type {value!r}: expected a byte like '0x83' or one of: {names}"
    )


def resolve_attribute(value: str | int) -> int:
    """The bit number of a GPT attribute given by name ("read-only") or number (0-63)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= 63:
            return value
        raise ValueError(f"attribute bit {value} is outside 0..63")
    if isinstance(value, str) and value in GPT_ATTRIBUTES:
        return GPT_ATTRIBUTES[value]
    names = ", ".join(GPT_ATTRIBUTES)
    raise ValueError(
        f"unknown GPT attribute {value!r}: expected a bit number 0..63 or one of: {names}"
    )
