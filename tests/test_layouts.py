"""Layouts for real boards (MBR with logical partitions, raw regions, fixed offsets and UUIDs,
GPT attributes, raw partitions filled from files) against two independent oracles:

- genimage builds the same layout from its own configuration; the MBR images must be
  byte-identical (except the CHS fields of EBR records, which genimage computes from the
  relative LBA: fdisk and avobuild write the absolute position), the GPT ones must agree on
  every partition as `sfdisk --json` reads them, and on the bytes of raw regions and raw
  partitions;
- `sfdisk --json` and `sfdisk -V` read every table we write.

The layouts are the shipped board layout and seeded random ones.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, Product, avobuild_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avobuild.disk.gpt import read_gpt
from avobuild.disk.image import assemble_disk
from avobuild.disk.mbr import ExtendedPartition, MbrPartition, MbrTable, read_mbr, write_mbr
from avobuild.disk.plan import DiskPlan, plan_layout
from avobuild.disk.table import (
    disk_guid,
    disk_signature,
    partition_guid,
    partition_uuid,
    read_partition_table,
)
from avobuild.errors import BuildError, InstallError, RecipeError
from avobuild.model.guids import GPT_ATTRIBUTES, GPT_TYPES, MBR_TYPES
from avobuild.model.layout import Layout, TableType, load_layout
from avobuild.model.serialize import from_jsonable, to_jsonable
from avobuild.model.tomlcheck import format_size

pytestmark = pytest.mark.skipif(shutil.which("genimage") is None, reason="genimage is missing")

SEED = "board-seed"
KIB = 1024
MIB = 1024 * 1024
SUNXI = Path("/usr/lib/u-boot/pine64_plus")
# The attribute bits genimage 16 can set, by its option names.
GENIMAGE_ATTRIBUTES = {"read-only": "read-only", "hidden": "hidden", "no-auto": "no-automount"}


# --- a layout described once, rendered as avobuild TOML and as a genimage configuration ----


@dataclass
class Part:
    name: str
    size: int
    role: str = "other"
    type_name: str | None = None
    offset: int | None = None
    bootable: bool = False
    file: Path | None = None
    attributes: list[str] = field(default_factory=list)
    uuid: uuid.UUID | None = None
    grow: bool = False


@dataclass
class Raw:
    name: str
    offset: int
    file: Path
    size: int | None = None


@dataclass
class Board:
    table: str
    alignment: int
    parts: list[Part]
    raws: list[Raw] = field(default_factory=list)
    size: int | None = None
    extended: int | None = None

    def toml(self) -> str:
        lines = ["[disk]", f'table = "{self.table}"', f"alignment = {self.alignment}"]
        if self.size is not None:
            lines.append(f"size = {self.size}")
        if self.extended is not None:
            lines.append(f"extended-partition = {self.extended}")
        for raw in self.raws:
            lines += ["", f"[raw.{raw.name}]", f"offset = {raw.offset}", f'file = "{raw.file}"']
            if raw.size is not None:
                lines.append(f"size = {raw.size}")
        for part in self.parts:
            lines += ["", f"[partition.{part.name}]", f'role = "{part.role}"']
            lines.append(f"size = {part.size}")
            if part.type_name:
                lines.append(f'type = "{part.type_name}"')
            if part.role.startswith("system"):
                lines.append('filesystem = "ext4"')
            if part.offset is not None:
                lines.append(f"offset = {part.offset}")
            if part.bootable:
                lines.append("bootable = true")
            if part.file is not None:
                lines.append(f'file = "{part.file}"')
            if part.attributes:
                lines.append(f"attributes = {json.dumps(part.attributes)}")
            if part.uuid is not None:
                lines.append(f'uuid = "{part.uuid}"')
            if part.grow:
                lines.append("grow = true")
        return "\n".join(lines) + "\n"

    def genimage(self, plan: DiskPlan) -> str:
        """The same layout for genimage, with the identifiers avobuild derives."""
        gpt = self.table == "gpt"
        options = [f'partition-table-type = "{self.table}"', f"align = {self.alignment}"]
        options.append("fill = true")
        if gpt:
            options.append(f'disk-uuid = "{disk_guid(plan, SEED)}"')
        else:
            options.append(f"disk-signature = {disk_signature(plan, SEED):#x}")
        if self.extended is not None:
            options.append(f"extended-partition = {self.extended}")
        blocks = []
        for raw in self.raws:
            blocks.append(
                f"partition {raw.name} {{ in-partition-table = false offset = {raw.offset} "
                f'image = "{raw.file}" }}'
            )
        for part, placed in zip(self.parts, plan.partitions, strict=True):
            settings = [f"size = {part.size}"]
            if part.offset is not None:
                settings.append(f"offset = {part.offset}")
            if gpt:
                guid = GPT_TYPES[part.type_name or "linux-generic"]
                settings.append(f'partition-type-uuid = "{guid}"')
                settings.append(f'partition-uuid = "{partition_guid(placed, SEED)}"')
                settings += [f"{GENIMAGE_ATTRIBUTES[name]} = true" for name in part.attributes]
            else:
                settings.append(f"partition-type = {MBR_TYPES[part.type_name or 'linux']:#x}")
            if part.bootable:
                settings.append("bootable = true")
            if part.file is not None:
                settings.append(f'image = "{part.file}"')
            if part.grow:
                settings.append("autoresize = true")
            blocks.append(f"partition {part.name} {{ {' '.join(settings)} }}")
        body = "\n  ".join(blocks)
        return (
            f"image disk.img {{\n  size = {plan.disk_size}\n  hdimage {{\n    "
            + "\n    ".join(options)
            + f"\n  }}\n  {body}\n}}\n"
        )


def run_genimage(work: Path, config: str) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    (work / "genimage.cfg").write_text(config)
    (work / "root").mkdir(exist_ok=True)
    result = subprocess.run(
        [
            "genimage",
            "--config",
            str(work / "genimage.cfg"),
            "--inputpath",
            str(work),
            "--outputpath",
            str(work / "images"),
            "--rootpath",
            str(work / "root"),
            "--tmppath",
            str(work / "tmp"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"genimage failed:\n{config}\n{result.stderr[-3000:]}"
    return work / "images" / "disk.img"


def build_ours(board_toml: str, work: Path) -> tuple[Layout, DiskPlan, Path]:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "layout.toml"
    path.write_text(board_toml)
    layout = load_layout(path)
    plan = plan_layout(layout)
    image = work / "ours.img"
    assemble_disk(image, plan, SEED, {})
    return layout, plan, image


def sfdisk_json(image: Path) -> dict[str, object]:
    completed = subprocess.run(
        ["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True
    )
    table = json.loads(completed.stdout)["partitiontable"]
    table.pop("device")
    for part in table.get("partitions", []):
        part.pop("node")
    return dict(table)


def assert_sfdisk_verifies(image: Path) -> None:
    result = subprocess.run(["sfdisk", "-V", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors detected" in result.stdout


def chs_bytes(plan: DiskPlan) -> set[int]:
    """Byte offsets of the CHS fields of the records of sector 0 and of every EBR."""
    sectors = [0] + [part.ebr_lba for part in plan.partitions if part.ebr_lba is not None]
    offsets: set[int] = set()
    for lba in sectors:
        for record in range(4):
            base = lba * 512 + 446 + 16 * record
            offsets |= {base + 1, base + 2, base + 3, base + 5, base + 6, base + 7}
    return offsets


def assert_sfdisk_writes_the_same_mbr(image: Path, plan: DiskPlan, work: Path) -> None:
    """sfdisk, given our table as a script, writes the same sector 0 and the same CHS fields.

    sfdisk places EBRs by its own rule (it reads only partition starts and sizes from the
    script), so EBR records are compared field by field where both placed the same EBR; sfdisk
    types the links between EBRs 0x05 where avobuild (like genimage) writes 0x0f.
    """
    blank = work / "sfdisk.img"
    with blank.open("wb") as handle:
        handle.truncate(image.stat().st_size)
    script = subprocess.run(
        ["sfdisk", "--dump", str(image)], capture_output=True, text=True, check=True
    ).stdout
    subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(blank)],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )
    assert read_at(image, 440, 72) == read_at(blank, 440, 72)
    with image.open("rb") as handle:
        ours = read_mbr(handle)
    with blank.open("rb") as handle:
        theirs = read_mbr(handle)
    assert [(p.number, p.first_lba, p.sectors, p.type_id) for p in ours.partitions] == [
        (p.number, p.first_lba, p.sectors, p.type_id) for p in theirs.partitions
    ]
    their_ebrs = [p.ebr_lba for p in theirs.partitions if p.logical]
    for index, part in enumerate(p for p in ours.partitions if p.logical):
        assert part.ebr_lba is not None
        mine = read_at(image, part.ebr_lba * 512 + 446, 32)
        other = read_at(blank, their_ebrs[index] * 512 + 446, 32)  # type: ignore[operator]
        assert mine[:8] == other[:8], f"record of partition {part.number}"
        link_mine, link_other = bytearray(mine[16:24]), bytearray(other[16:24])
        if (
            index + 1 < len(their_ebrs)
            and their_ebrs[index + 1]
            == [p.ebr_lba for p in ours.partitions if p.logical][index + 1]
        ):
            assert (link_mine[4], link_other[4]) == (0x0F, 0x05)
            link_mine[4] = link_other[4] = 0
            assert link_mine == link_other, f"link after partition {part.number}"
    blank.unlink()


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The [start, end) ranges of a sparse file that hold data (SEEK_DATA/SEEK_HOLE)."""
    extents = []
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        position = 0
        while position < size:
            try:
                start = os.lseek(handle.fileno(), position, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(handle.fileno(), start, os.SEEK_HOLE)
            extents.append((start, end))
            position = end
    return extents


def differing_bytes(first: Path, second: Path) -> list[int]:
    """Offsets where two equally long images differ. Both are sparse: only the ranges where
    either holds data are read (a hole reads as zeros on the other side)."""
    assert first.stat().st_size == second.stat().st_size
    ranges = sorted(data_extents(first) + data_extents(second))
    found: list[int] = []
    block = 1 << 20
    with first.open("rb") as a, second.open("rb") as b:
        done = 0
        for start, end in ranges:
            position = max(start, done)
            while position < end:
                length = min(block, end - position)
                a.seek(position)
                b.seek(position)
                chunk, other = a.read(length), b.read(length)
                if chunk != other:
                    found += [position + i for i in range(length) if chunk[i] != other[i]]
                position += length
            done = max(done, end)
    return found


def read_at(image: Path, offset: int, size: int) -> bytes:
    with image.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def compare_with_genimage(board: Board, work: Path) -> tuple[DiskPlan, Path]:
    """Build `board` both ways and check every oracle; return our plan and image."""
    layout, plan, ours = build_ours(board.toml(), work / "ours")
    theirs = run_genimage(work / "genimage", board.genimage(plan))
    assert_sfdisk_verifies(ours)
    assert_sfdisk_verifies(theirs)
    our_table, their_table = sfdisk_json(ours), sfdisk_json(theirs)
    if board.table == "gpt":
        # genimage starts the usable range at its first partition; avobuild, like sfdisk and
        # gdisk, right after the primary entry array.
        assert our_table.pop("firstlba") == 34
        their_table.pop("firstlba")
    assert our_table == their_table
    if board.table == "mbr":
        # genimage computes EBR CHS fields from the relative LBA and wraps cylinders past
        # 1023; avobuild writes them as sfdisk does, which the sfdisk oracle checks.
        masked = chs_bytes(plan)
        assert [offset for offset in differing_bytes(ours, theirs) if offset not in masked] == []
        assert_sfdisk_writes_the_same_mbr(ours, plan, work)
    else:
        with ours.open("rb") as a, theirs.open("rb") as b:
            assert read_gpt(a).partitions == read_gpt(b).partitions
    for raw in board.raws:
        expected = raw.file.read_bytes()
        assert read_at(ours, raw.offset, len(expected)) == expected, raw.name
        assert read_at(theirs, raw.offset, len(expected)) == expected, raw.name
    for part, placed in zip(board.parts, plan.partitions, strict=True):
        if part.file is not None:
            expected = part.file.read_bytes()
            assert read_at(ours, placed.offset, len(expected)) == expected, part.name
    # Our reader finds every partition where sfdisk sees it, with the layout's labels.
    with ours.open("rb") as handle:
        found = read_partition_table(handle, layout)
    listed = [p for p in our_table["partitions"] if p["type"] not in ("f", "5")]  # type: ignore[attr-defined]
    assert [(p.offset // 512, p.size // 512) for p in found.partitions] == [
        (p["start"], p["size"]) for p in listed
    ]
    assert [p.label for p in found.partitions] == [p.spec.label for p in plan.partitions]
    return plan, ours


# --- the shipped board layouts --------------------------------------------------------------


needs_sunxi = pytest.mark.skipif(
    not (SUNXI / "sunxi-spl.bin").is_file(), reason="u-boot-sunxi is not installed"
)


@needs_sunxi
def test_shipped_mbr_board_layout_matches_genimage(tmp_path: Path) -> None:
    layout = load_layout(REPO / "layouts" / "aarch64-uboot-mbr.toml")
    plan = plan_layout(layout)
    board = Board(
        "mbr",
        layout.alignment,
        [
            Part(
                spec.label,
                spec.size,
                spec.role.value,
                spec.type_name,
                bootable=spec.bootable,
            )
            for spec in layout.partitions
        ],
        [Raw(r.name, r.offset, r.file, r.size) for r in layout.raw_regions],
    )
    ours_plan, image = compare_with_genimage(board, tmp_path)
    assert [p.offset for p in ours_plan.partitions] == [p.offset for p in plan.partitions]
    table = sfdisk_json(image)
    parts = table["partitions"]
    assert table["label"] == "dos"
    assert [(p["type"], p.get("bootable", False)) for p in parts] == [  # type: ignore[index,union-attr,attr-defined]
        ("c", True),
        ("83", False),
        ("83", False),
        ("f", False),
        ("83", False),
        ("83", False),
    ]
    assert [p["start"] * 512 for p in parts[4:]] == [  # type: ignore[index]
        plan.by_label("recovery").offset,  # type: ignore[union-attr]
        plan.by_label("data").offset,  # type: ignore[union-attr]
    ]
    # the boot ROM finds the SPL at 8K, the SPL finds U-Boot at 40K
    assert read_at(image, 8 * KIB, 32 * KIB) == (SUNXI / "sunxi-spl.bin").read_bytes()
    fit = (SUNXI / "u-boot-sunxi-with-spl.fit.itb").read_bytes()
    assert read_at(image, 40 * KIB, len(fit)) == fit
    assert read_at(image, 40 * KIB, 4) == b"\xd0\x0d\xfe\xed"  # a FIT is a device tree blob


@needs_sunxi
def test_the_sunxi_spl_does_not_fit_a_gpt(tmp_path: Path) -> None:
    text = (REPO / "layouts" / "aarch64-uboot-mbr.toml").read_text()
    layout_path = tmp_path / "gpt.toml"
    layout_path.write_text(
        text.replace('table = "mbr"', 'table = "gpt"')
        .replace('type = "fat32-lba"', 'type = "esp"')
        .replace('type = "linux"', 'type = "linux-generic"')
    )
    with pytest.raises(RecipeError) as error:
        plan_layout(load_layout(layout_path))
    message = str(error.value)
    assert str(layout_path) in message
    assert "[raw.spl] offset: the region at 8K..40K overlaps the GPT" in message
    assert "440..17K" in message


def test_shipped_gpt_board_layout_still_plans_as_before() -> None:
    plan = plan_layout(load_layout(REPO / "layouts" / "aarch64-uboot-ab.toml"))
    assert [(p.spec.label, p.offset, p.size) for p in plan.partitions] == [
        ("boot", 4 * MIB, 128 * MIB),
        ("system-a", 132 * MIB, 1024 * MIB),
        ("system-b", 1156 * MIB, 1024 * MIB),
        ("recovery", 2180 * MIB, 128 * MIB),
        ("data", 2308 * MIB, 512 * MIB),
    ]
    assert plan.disk_size == 2824 * MIB


# --- seeded random layouts ------------------------------------------------------------------

_MBR_NAMES = sorted({name for name, byte in MBR_TYPES.items() if name not in ("fat32", "fat16")})
_GPT_NAMES = sorted(GPT_TYPES)


def random_board(rng: random.Random, table: str, files: Path) -> Board:
    """A layout genimage can express too: sizes and fixed offsets on the alignment."""
    files.mkdir(parents=True, exist_ok=True)
    alignment = rng.choice([512, 4 * KIB, 64 * KIB, MIB])
    count = rng.randint(2, 9 if table == "mbr" else 7)
    extended = None
    if table == "mbr" and rng.random() < 0.3:
        extended = rng.randint(2, min(4, count))
    logical_from = (extended - 1) if extended else (3 if count > 4 and table == "mbr" else None)
    unit = max(alignment, 64 * KIB)
    slot_size = rng.randint(1, 6) * unit
    slot_positions = rng.sample(range(count), 2)
    table_end = 512 if table == "mbr" else 34 * 512
    raws: list[Raw] = []
    cursor = table_end
    for index in range(rng.choice([0, 0, 1, 2])):
        start = cursor + rng.randint(0, 8) * 512
        data = rng.randbytes(rng.randint(1, 12 * KIB))
        blob = files / f"blob{index}.bin"
        blob.write_bytes(data)
        raws.append(Raw(f"blob{index}", start, blob))
        cursor = start + len(data)
    if table == "mbr" and rng.random() < 0.3:
        code = files / "mbr-code.bin"
        code.write_bytes(rng.randbytes(440))
        raws.append(Raw("boot-code", 0, code))
    parts: list[Part] = []
    for index in range(count):
        logical = logical_from is not None and index >= logical_from
        size = slot_size if index in slot_positions else rng.randint(1, 6) * unit
        role = "other"
        if index in slot_positions:
            role = "system-a" if index == min(slot_positions) else "system-b"
        names = _MBR_NAMES if table == "mbr" else _GPT_NAMES
        part = Part(f"p{index}", size, role, rng.choice(names))
        automatic = -(-cursor // alignment) * alignment + (alignment if logical else 0)
        if (index == 0 and raws) or rng.random() < 0.25:
            part.offset = automatic + rng.randint(0, 3) * alignment
        start = part.offset if part.offset is not None else automatic
        part.bootable = not logical and rng.random() < 0.2
        if table == "gpt":
            part.attributes = rng.sample(sorted(GENIMAGE_ATTRIBUTES), rng.randint(0, 2))
            if rng.random() < 0.3:
                part.uuid = uuid.UUID(int=rng.getrandbits(128), version=4)
        if role == "other" and rng.random() < 0.25:
            content = files / f"{part.name}.bin"
            content.write_bytes(rng.randbytes(rng.randint(1, size)))
            part.file = content
        parts.append(part)
        cursor = start + size
    board = Board(table, alignment, parts, raws, extended=extended)
    if rng.random() < 0.3 and parts[-1].role == "other" and parts[-1].file is None:
        parts[-1].grow = True
        backup = 0 if table == "mbr" else 33 * 512
        board.size = -(-(cursor + backup) // alignment) * alignment + rng.randint(1, 9) * unit
    return board


@pytest.mark.parametrize("seed", range(12))
def test_random_layouts_match_genimage(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    table = "mbr" if seed % 2 == 0 else "gpt"
    board = random_board(rng, table, tmp_path / "files")
    _, image = compare_with_genimage(board, tmp_path)
    if table == "gpt":
        found = {p["name"]: p for p in sfdisk_json(image)["partitions"]}  # type: ignore[attr-defined]
        for part in board.parts:
            if part.uuid is not None:
                assert found[part.name]["uuid"] == str(part.uuid).upper()


def test_large_mbr_disk_saturates_chs(tmp_path: Path) -> None:
    """Past cylinder 1023 the CHS fields read 1023/254/63, as sfdisk writes them."""
    board = Board(
        "mbr",
        MIB,
        [
            Part("a", 16 * MIB, "system-a", "linux"),
            Part("b", 16 * MIB, "system-b", "linux", offset=9 * 1024 * MIB),
            Part("c", 16 * MIB, "other", "fat32-lba", bootable=True),
            Part("d", 16 * MIB, "other", "linux-swap"),
            Part("e", 16 * MIB, "other", "linux-swap"),
        ],
    )
    plan, image = compare_with_genimage(board, tmp_path)
    records = read_at(image, 446, 64)
    assert records[16 + 5 : 16 + 8] == b"\xfe\xff\xff"  # the end of b, far past 8 GiB
    assert plan.disk_size > 9 * 1024 * MIB


# --- what only sfdisk checks: attributes genimage cannot set, 4096-byte sectors -------------


def test_gpt_attributes_and_fixed_uuids(tmp_path: Path) -> None:
    fixed = uuid.UUID("4b1dc0de-0000-4000-8000-00000000a001")
    board = Board(
        "gpt",
        MIB,
        [
            Part("esp", 2 * MIB, "boot", "esp", attributes=["required", "no-block-io-protocol"]),
            Part("a", 2 * MIB, "system-a", "root-arm64", attributes=["read-only", "growfs"]),
            Part("b", 2 * MIB, "system-b", "root-arm64", bootable=True, uuid=fixed),
            Part("data", 2 * MIB, "data", "var", attributes=["no-auto", "hidden"]),
        ],
    )
    _, plan, image = build_ours(board.toml().replace('"growfs"]', '"growfs", 48]'), tmp_path)
    assert_sfdisk_verifies(image)
    parts = {p["name"]: p for p in sfdisk_json(image)["partitions"]}  # type: ignore[attr-defined]
    assert parts["esp"]["attrs"] == "RequiredPartition NoBlockIOProtocol"
    assert parts["a"]["attrs"] == "GUID:48,59,60"
    assert parts["b"]["attrs"] == "LegacyBIOSBootable"
    assert parts["b"]["uuid"] == str(fixed).upper()
    assert parts["data"]["attrs"] == "GUID:62,63"
    assert parts["a"]["uuid"] == str(partition_guid(plan.by_label("a"), SEED)).upper()  # type: ignore[arg-type]
    assert partition_uuid(plan, plan.by_label("b"), SEED) == str(fixed)  # type: ignore[arg-type]
    with image.open("rb") as handle:
        table = read_gpt(handle)
    bits = {p.name: p.attributes for p in table.partitions}
    assert bits["a"] == (1 << 48) | (1 << GPT_ATTRIBUTES["growfs"]) | (1 << 60)


def test_mbr_with_4096_byte_sectors(tmp_path: Path) -> None:
    board = Board(
        "mbr",
        MIB,
        [
            Part(f"p{i}", 2 * MIB, role, "linux")
            for i, role in enumerate(["system-a", "system-b", "other", "other", "data", "other"])
        ],
    )
    text = board.toml().replace('table = "mbr"', 'table = "mbr"\nsector-size = 4096')
    _, plan, image = build_ours(text, tmp_path)
    # sfdisk 2.38 has no --sector-size; fdisk -b reads the table with 4096-byte sectors
    listing = subprocess.run(
        ["fdisk", "-b", "4096", "-l", "-o", "Start,Sectors,Id", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Units: sectors of 1 * 4096 = 4096 bytes" in listing
    rows = [
        line.split()
        for line in listing.splitlines()[
            listing.splitlines().index(
                next(line for line in listing.splitlines() if line.split()[:1] == ["Start"])
            )
            + 1 :
        ]
    ]
    listed = [(int(start), int(size)) for start, size, type_id in rows if type_id != "f"]
    assert listed == [(p.first_lba, p.last_lba - p.first_lba + 1) for p in plan.partitions]
    assert [p.first_lba * 4096 for p in plan.partitions][3] == plan.by_label("p3").offset  # type: ignore[union-attr]
    with image.open("rb") as handle:
        table = read_mbr(handle, 4096)
    assert [p.first_lba for p in table.partitions] == [p.first_lba for p in plan.partitions]


def test_tables_are_reproducible_from_the_seed(tmp_path: Path) -> None:
    board = Board(
        "mbr",
        MIB,
        [Part(f"p{i}", MIB, role) for i, role in enumerate(["system-a", "system-b", "data"])],
    )
    _, plan, first = build_ours(board.toml(), tmp_path / "one")
    _, _, second = build_ours(board.toml(), tmp_path / "two")
    assert first.read_bytes() == second.read_bytes()
    signature = int(sfdisk_json(first)["id"], 16)  # type: ignore[arg-type]
    assert signature == disk_signature(plan, SEED) != 0
    other = plan_layout(load_layout(tmp_path / "one" / "layout.toml"))
    assert disk_signature(other, "another seed") != signature
    assert partition_uuid(plan, plan.partitions[2], SEED) == f"{signature:08x}-03"
    fixed = board.toml().replace('table = "mbr"', 'table = "mbr"\nsignature = "0xDEADBEEF"')
    _, _, third = build_ours(fixed, tmp_path / "three")
    assert sfdisk_json(third)["id"] == "0xdeadbeef"


# --- the partition table reader the installer uses ------------------------------------------


def test_read_partition_table_labels_mbr_partitions_from_the_layout(tmp_path: Path) -> None:
    board = Board(
        "mbr",
        MIB,
        [
            Part(n, MIB, r)
            for n, r in [
                ("boot", "boot"),
                ("rootfs-a", "system-a"),
                ("rootfs-b", "system-b"),
                ("cfg", "other"),
                ("userdata", "data"),
            ]
        ],
    )
    layout, plan, image = build_ours(board.toml(), tmp_path)
    with image.open("rb") as handle:
        table = read_partition_table(handle, layout)
        unlabelled = read_partition_table(handle)
    assert table.table is TableType.MBR
    userdata = table.find("userdata")
    assert userdata is not None
    assert (userdata.number, userdata.offset) == (6, plan.by_label("userdata").offset)  # type: ignore[union-attr]
    assert [p.label for p in unlabelled.partitions] == [None] * 5
    # a layout that did not build this disk is refused, naming both places
    moved = board.toml().replace("[partition.cfg]", "[partition.cfg]\noffset = 16777216")
    (tmp_path / "moved.toml").write_text(moved)
    with image.open("rb") as handle, pytest.raises(InstallError) as error:
        read_partition_table(handle, load_layout(tmp_path / "moved.toml"))
    assert "[partition.cfg] is partition 5" in str(error.value)
    assert "this layout did not build the disk" in str(error.value)


def test_read_partition_table_on_gpt_finds_names(tmp_path: Path) -> None:
    board = Board("gpt", MIB, [Part("a", MIB, "system-a"), Part("b", MIB, "system-b")])
    _, _, image = build_ours(board.toml(), tmp_path)
    with image.open("rb") as handle:
        table = read_partition_table(handle)
    assert table.table is TableType.GPT
    assert [(p.number, p.label) for p in table.partitions] == [(1, "a"), (2, "b")]


def _mbr_image(tmp_path: Path) -> tuple[Path, DiskPlan]:
    board = Board(
        "mbr",
        4 * KIB,
        [
            Part(f"p{i}", 64 * KIB, r)
            for i, r in enumerate(["system-a", "system-b", "other", "other", "other", "other"])
        ],
    )
    _, plan, image = build_ours(board.toml(), tmp_path)
    return image, plan


def test_mbr_reader_refuses_loops_and_strays(tmp_path: Path) -> None:
    image, plan = _mbr_image(tmp_path)
    original = image.read_bytes()
    assert plan.extended is not None
    last_ebr = plan.partitions[-1].ebr_lba
    second_ebr = plan.partitions[4].ebr_lba
    assert last_ebr is not None and second_ebr is not None
    cases = {
        # the last EBR links back to the second one: a loop
        "loops": (
            last_ebr * 512 + 462,
            bytes([0, 0, 0, 0, 0x0F, 0, 0, 0])
            + (second_ebr - plan.extended.first_lba).to_bytes(4, "little")
            + (8).to_bytes(4, "little"),
        ),
        # a logical partition running past the extended partition
        "outside the extended partition": (
            last_ebr * 512 + 446 + 12,
            (1 << 20).to_bytes(4, "little"),
        ),
        "no 55 AA boot signature at byte offset 510": (510, b"\0\0"),
    }
    for expected, (offset, patch) in cases.items():
        data = bytearray(original)
        data[offset : offset + len(patch)] = patch
        image.write_bytes(bytes(data))
        with image.open("rb") as handle, pytest.raises(InstallError, match=expected):
            read_mbr(handle)


# --- errors name the layout file, the key and the offsets -----------------------------------


def _layout_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "layout.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as error:
        plan_layout(load_layout(path))
    message = str(error.value)
    assert message.startswith(f"{path}: ["), message
    return message


_SLOTS = """
[partition.a]
role = "system-a"
size = "1M"
[partition.b]
role = "system-b"
size = "1M"
"""


def _blob(tmp_path: Path, size: int, name: str = "blob.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(random.Random(size).randbytes(size))
    return path


@pytest.mark.parametrize(
    ("table", "raw", "expected"),
    [
        # an i.MX-style header at 1K collides with the GPT entries
        ("gpt", 'offset = "1K"', "[raw.spl] offset: the region at 1K..5K overlaps the GPT"),
        ("mbr", "offset = 256", "[raw.spl] offset: the region at 256..4352 overlaps the MBR"),
        (
            "mbr",
            'offset = "1022K"',
            "[raw.spl] file: blob.bin (4K) at offset 1022K ends at 1026K, past the start of the",
        ),
    ],
)
def test_raw_region_collisions(tmp_path: Path, table: str, raw: str, expected: str) -> None:
    blob = _blob(tmp_path, 4096)
    text = f'[disk]\ntable = "{table}"\n[raw.spl]\n{raw}\nfile = "{blob.name}"\n' + _SLOTS
    message = _layout_error(tmp_path, text)
    assert expected in message


def test_blob_that_does_not_fit_before_the_first_partition(tmp_path: Path) -> None:
    blob = _blob(tmp_path, 1536 * KIB, "u-boot.bin")
    text = '[disk]\ntable = "mbr"\n[raw.u-boot]\noffset = "32K"\nfile = "u-boot.bin"\n' + _SLOTS
    message = _layout_error(tmp_path, text)
    assert (
        "[raw.u-boot] file: u-boot.bin (1536K) at offset 32K ends at 1568K, past the start of "
        "the first partition [partition.a] at 1M" in message
    )
    assert "[partition.a] offset of at least 2M" in message
    # the suggested fix works
    (tmp_path / "layout.toml").write_text(
        text.replace('size = "1M"', 'size = "1M"\noffset = "2M"', 1)
    )
    plan = plan_layout(load_layout(tmp_path / "layout.toml"))
    assert plan.partitions[0].offset == 2 * MIB
    del blob


def test_raw_regions_overlapping_each_other_and_partitions(tmp_path: Path) -> None:
    _blob(tmp_path, 8192)
    two = (
        '[disk]\ntable = "mbr"\n[raw.one]\noffset = "8K"\nfile = "blob.bin"\n'
        '[raw.two]\noffset = "12K"\nfile = "blob.bin"\n' + _SLOTS
    )
    assert "[raw.one] offset: the region at 8K..16K overlaps [raw.two] at 12K..20K" in (
        _layout_error(tmp_path, two)
    )
    inside = '[disk]\ntable = "gpt"\n' + _SLOTS + '[raw.env]\noffset = "2M"\nfile = "blob.bin"\n'
    assert "[raw.env] offset: the region at 2M..2056K overlaps [partition.b] at 2M..3M" in (
        _layout_error(tmp_path, inside)
    )
    past = (
        '[disk]\ntable = "mbr"\nsize = "4M"\n'
        + _SLOTS
        + '[raw.env]\noffset = "4092K"\nfile = "blob.bin"\n'
    )
    assert "[raw.env] offset: the region at 4092K..4100K ends past the end of the disk (4M)" in (
        _layout_error(tmp_path, past)
    )


def test_boot_code_at_offset_zero_is_allowed_up_to_440_bytes(tmp_path: Path) -> None:
    code = _blob(tmp_path, 440, "mbr.bin")
    text = '[disk]\ntable = "mbr"\n[raw.mbr]\noffset = 0\nfile = "mbr.bin"\n' + _SLOTS
    (tmp_path / "layout.toml").write_text(text)
    layout = load_layout(tmp_path / "layout.toml")
    image = tmp_path / "disk.img"
    plan = plan_layout(layout)
    assemble_disk(image, plan, SEED, {})
    assert read_at(image, 0, 440) == code.read_bytes()
    assert_sfdisk_verifies(image)
    _blob(tmp_path, 441, "mbr.bin")
    assert (
        "[raw.mbr] offset: the region at 0..441 overlaps the MBR partition records at "
        "440..512" in _layout_error(tmp_path, text)
    )


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ('size = "1M"\n[partition.b]', 'size = "1M"\noffset = "8K"\n[partition.b]'),
            "[partition.a] offset: 8K is inside the GPT (protective MBR, header and entries), "
            "which ends at 17K",
        ),
        (
            ('role = "system-b"', 'role = "system-b"\noffset = "1536K"'),
            "[partition.b] offset: [partition.b] at 1536K..2560K overlaps [partition.a] at 1M..2M",
        ),
        (
            ('role = "system-b"', 'role = "system-b"\nuuid = "nonsense"'),
            '[partition.b] uuid: expected a UUID like "0fc63daf-',
        ),
        (
            ('role = "system-b"', 'role = "system-b"\nattributes = ["read-only", "sticky"]'),
            "[partition.b] attributes[1]: unknown GPT attribute 'sticky'",
        ),
        (
            ('role = "system-b"', 'role = "system-b"\nattributes = [64]'),
            "[partition.b] attributes[0]: attribute bit 64 is outside 0..63",
        ),
        (
            ('table = "gpt"', 'table = "gpt"\nsignature = "0x1234"'),
            "[disk] signature: expected no 'signature' in a GPT layout",
        ),
        (
            ('role = "system-b"', 'role = "system-b"\nfile = "missing.bin"'),
            "[partition.b] file: expected an existing file (relative to the layout file)",
        ),
        (
            ('role = "system-b"', 'role = "system-b"\nfilesystem = "ext4"\nfile = "blob.bin"'),
            '[partition.b] file: expected no file with filesystem = "ext4"',
        ),
        (
            (
                "[partition.a]",
                '[partition.c]\nrole = "other"\nsize = "4K"\nfile = "blob.bin"\n[partition.a]',
            ),
            "[partition.c] file: expected a file that fits the 4K partition",
        ),
        (
            (
                "[partition.a]",
                '[partition.c]\nrole = "other"\nsize = "1M"\ngrow = true\n[partition.a]',
            ),
            "[disk] size: required when a partition has grow = true",
        ),
    ],
)
def test_gpt_layout_errors(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    _blob(tmp_path, 8192)
    text = ('[disk]\ntable = "gpt"\n' + _SLOTS).replace(*edit)
    assert expected in _layout_error(tmp_path, text)


_SIX = "".join(
    f'[partition.p{index}]\nrole = "{role}"\nsize = "1M"\n'
    for index, role in enumerate(["system-a", "system-b", "other", "other", "other", "other"])
)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            # partition 5 (p3) at the end of p2: no sector left for its EBR
            ('[partition.p3]\nrole = "other"', '[partition.p3]\nrole = "other"\noffset = "4M"'),
            "[partition.p3] offset: logical partition 5 starts at 4M, but its EBR needs one "
            "sector after the end of the partitions before it (4M); expected an offset of at "
            "least 4194816 (5M keeps the 1M alignment)",
        ),
        (
            ('[partition.p5]\nrole = "other"', '[partition.p5]\nrole = "other"\noffset = "5M"'),
            "[partition.p5] offset: logical partition 7 starts at 5M",
        ),
        (
            ('[partition.p4]\nrole = "other"', '[partition.p4]\nrole = "other"\nbootable = true'),
            "[partition.p4] bootable: logical partition 6 lies in the extended partition",
        ),
        (
            ('table = "mbr"', 'table = "mbr"\nextended-partition = 5'),
            "[disk] extended-partition: expected a primary slot number 1-4, got 5",
        ),
        (
            (
                '[partition.p0]\nrole = "system-a"',
                '[partition.p0]\nrole = "system-a"\ntype = "root-arm64"',
            ),
            "[partition.p0] type: unknown MBR partition type 'root-arm64'",
        ),
        (
            (
                '[partition.p0]\nrole = "system-a"',
                '[partition.p0]\nrole = "system-a"\ntype = "0x0f"',
            ),
            "[partition.p0] type: type '0x0f' marks an extended partition",
        ),
        (
            (
                '[partition.p0]\nrole = "system-a"',
                '[partition.p0]\nrole = "system-a"\nuuid = "4b1dc0de-0000-4000-8000-00000000a001"',
            ),
            "[partition.p0] uuid: expected no 'uuid' in a MBR layout",
        ),
        (
            (
                '[partition.p0]\nrole = "system-a"',
                '[partition.p0]\nrole = "system-a"\nattributes = ["read-only"]',
            ),
            "[partition.p0] attributes: expected no 'attributes' in a MBR layout",
        ),
        (
            (
                '[partition.p5]\nrole = "other"\nsize = "1M"',
                '[partition.p5]\nrole = "other"\nsize = "3T"',
            ),
            "[partition.p5]: ends at 3145737M, past what an MBR addresses with 512-byte "
            "sectors (2T)",
        ),
        (
            ('table = "mbr"', 'table = "mbr"\nsignature = "12345678"'),
            "[disk] signature: expected a 32-bit hex number like \"0x1234abcd\", got '12345678'",
        ),
    ],
)
def test_mbr_layout_errors(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    text = ('[disk]\ntable = "mbr"\n' + _SIX).replace(*edit)
    assert text != '[disk]\ntable = "mbr"\n' + _SIX
    assert expected in _layout_error(tmp_path, text)


def test_extended_partition_slot_leaving_no_logical_partition(tmp_path: Path) -> None:
    text = '[disk]\ntable = "mbr"\nextended-partition = 3\n' + _SLOTS
    assert (
        "[disk] extended-partition: slot 3 leaves no partition to be logical (the layout "
        "has 2)" in _layout_error(tmp_path, text)
    )


def test_duplicate_uuid_and_names(tmp_path: Path) -> None:
    fixed = '\nuuid = "4b1dc0de-0000-4000-8000-00000000a001"\n'
    text = '[disk]\ntable = "gpt"\n' + _SLOTS.replace('size = "1M"\n', 'size = "1M"' + fixed)
    assert (
        "[partition.b] uuid: 4b1dc0de-0000-4000-8000-00000000a001 is also the uuid of "
        "[partition.a]" in _layout_error(tmp_path, text)
    )
    _blob(tmp_path, 512)
    text = '[disk]\ntable = "mbr"\n[raw.a]\noffset = "4K"\nfile = "blob.bin"\n' + _SLOTS
    assert "[raw.a]: a partition has the same name" in _layout_error(tmp_path, text)


def test_fixed_offset_after_a_growing_partition(tmp_path: Path) -> None:
    text = '[disk]\ntable = "mbr"\nsize = "16M"\n' + _SLOTS.replace(
        'role = "system-a"\nsize = "1M"', 'role = "system-a"\nsize = "1M"\ngrow = true'
    ).replace('role = "system-b"\nsize = "1M"', 'role = "system-b"\nsize = "1M"\noffset = "8M"')
    message = _layout_error(tmp_path, text)
    assert "[partition.b] offset: a fixed offset cannot follow [partition.a]" in message


def test_layout_without_a_boot_partition(tmp_path: Path) -> None:
    path = tmp_path / "layout.toml"
    path.write_text('[disk]\ntable = "mbr"\n' + _SLOTS)
    plan = plan_layout(load_layout(path))
    assert [p.spec.role.value for p in plan.partitions] == ["system-a", "system-b"]


def test_image_without_a_boot_partition_names_the_layout(product: Product, tmp_path: Path) -> None:
    text = product.layout.read_text()
    start = text.index("[partition.boot]")
    end = text.index("[partition.system-a]")
    product.layout.write_text(text[:start] + text[end:])
    result = avobuild_cli("image", product.recipe, "-o", tmp_path / "out", check=False)
    assert result.returncode == BuildError.exit_code
    assert f"{product.layout}: no partition has role 'boot'" in result.stderr
    assert "boot state" in result.stderr


def test_raw_partition_size_defaults_to_its_file(tmp_path: Path) -> None:
    blob = _blob(tmp_path, 5000)
    path = tmp_path / "layout.toml"
    path.write_text(
        '[disk]\ntable = "gpt"\n[partition.firmware]\nrole = "other"\nfile = "blob.bin"\n' + _SLOTS
    )
    layout = load_layout(path)
    firmware = layout.by_label("firmware")
    assert firmware is not None
    assert (firmware.size, firmware.file) == (5120, blob.resolve())
    assert format_size(firmware.size) == "5K"


@needs_sunxi
def test_board_layout_and_plan_round_trip() -> None:
    """The new layout fields (raw regions, MBR types, EBRs) survive the JSON round trip."""
    layout = load_layout(REPO / "layouts" / "aarch64-uboot-mbr.toml")
    assert from_jsonable(Layout, json.loads(json.dumps(to_jsonable(layout)))) == layout
    plan = plan_layout(layout)
    assert from_jsonable(DiskPlan, json.loads(json.dumps(to_jsonable(plan)))) == plan
    assert plan.extended is not None and [p.number for p in plan.partitions] == [1, 2, 3, 5, 6]


# --- the MBR reader never fails in any other way --------------------------------------------


def _mbr_fuzz_base() -> tuple[bytes, list[tuple[int, int]]]:
    """A 6-partition MBR image (4K alignment) and the byte ranges of its sector 0 and EBRs."""
    size = 256 * 512
    image = io.BytesIO(bytes(size))
    table = MbrTable(
        0x1234ABCD,
        512,
        (
            MbrPartition(1, 0x0C, 8, 24, bootable=True),
            MbrPartition(2, 0x83, 32, 32),
            MbrPartition(3, 0x83, 64, 32),
            MbrPartition(5, 0x83, 104, 16, ebr_lba=96),
            MbrPartition(6, 0x83, 136, 40, ebr_lba=128),
            MbrPartition(7, 0x82, 200, 56, ebr_lba=192),
        ),
        ExtendedPartition(4, 96, 160),
    )
    write_mbr(image, size, table)
    regions = [(lba * 512 + 440, lba * 512 + 512) for lba in (0, 96, 128, 192)]
    return image.getvalue(), regions


MBR_FUZZ_BASE, MBR_FUZZ_REGIONS = _mbr_fuzz_base()


def _check_mbr_read(data: bytes) -> None:
    try:
        table = read_mbr(io.BytesIO(data))
    except InstallError:
        return
    sectors = len(data) // 512
    spans = sorted((p.first_lba, p.last_lba) for p in table.partitions)
    spans += sorted((p.ebr_lba, p.ebr_lba) for p in table.partitions if p.ebr_lba is not None)
    spans.sort()
    for first, last in spans:
        assert 1 <= first <= last < sectors
    for before, after in itertools.pairwise(spans):
        assert before[1] < after[0]
    assert len(table.partitions) <= 4 + 128


def test_mbr_fuzz_base_reads_back() -> None:
    table = read_mbr(io.BytesIO(MBR_FUZZ_BASE))
    assert [(p.number, p.first_lba) for p in table.partitions] == [
        (1, 8),
        (2, 32),
        (3, 64),
        (5, 104),
        (6, 136),
        (7, 200),
    ]


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.binary(max_size=8 * 512))
def test_mbr_reader_on_random_bytes(data: bytes) -> None:
    _check_mbr_read(data.ljust(512, b"\0")[:-2] + b"\x55\xaa" if len(data) >= 512 else data)


@settings(
    derandomize=True, max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 71), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    length=st.sampled_from([256 * 512, 200 * 512, 100 * 512]),
)
def test_mbr_reader_on_mutated_tables(mutations: list[tuple[int, int, int]], length: int) -> None:
    image = bytearray(MBR_FUZZ_BASE)
    for region, position, value in mutations:
        start, _ = MBR_FUZZ_REGIONS[region]
        image[start + position] = value
    _check_mbr_read(bytes(image[:length]))


# --- a whole factory image on an MBR board layout -------------------------------------------


def test_factory_image_on_an_mbr_board_layout(product: Product, tmp_path: Path) -> None:
    """The test product moved to an MBR with a boot loader blob, a raw firmware partition and
    logical partitions; every filesystem still checks out and lands where sfdisk sees it."""
    blob = product.root / "spl.bin"
    blob.write_bytes(random.Random(7).randbytes(24 * KIB))
    firmware = product.root / "firmware.bin"
    firmware.write_bytes(random.Random(8).randbytes(300 * KIB))
    text = (
        product.layout.read_text()
        .replace('table = "gpt"', 'table = "mbr"')
        .replace('type = "esp"', 'type = "fat32-lba"\nbootable = true')
        .replace('type = "root-x86-64"', 'type = "linux"')
        .replace('type = "linux-generic"', 'type = "linux"')
    )
    text = text.replace(
        "[partition.boot]",
        '[raw.spl]\noffset = "8K"\nfile = "spl.bin"\n\n'
        '[partition.firmware]\nrole = "other"\ntype = "non-fs-data"\nfile = "firmware.bin"\n\n'
        "[partition.boot]",
    )
    product.layout.write_text(text)
    out = tmp_path / "out"
    avobuild_cli("image", product.recipe, "-o", out)
    image = next(out.glob("*.img"))
    assert_sfdisk_verifies(image)
    plan = plan_layout(load_layout(product.layout))
    listed = [p for p in sfdisk_json(image)["partitions"] if p["type"] != "f"]  # type: ignore[attr-defined]
    assert [(p["start"] * 512, p["type"]) for p in listed] == [
        (part.offset, f"{part.spec.mbr_type:x}") for part in plan.partitions
    ]
    assert [p.number for p in plan.partitions] == [1, 2, 3, 5, 6, 7]
    assert read_at(image, 8 * KIB, 24 * KIB) == blob.read_bytes()
    assert read_at(image, plan.partitions[0].offset, 300 * KIB) == firmware.read_bytes()
    for label in ("system-a", "system-b", "data", "recovery"):
        part = plan.by_label(label)
        assert part is not None
        extracted = tmp_path / f"{label}.img"
        extracted.write_bytes(read_at(image, part.offset, part.size))
        subprocess.run(["e2fsck", "-fn", str(extracted)], capture_output=True, check=True)
        extracted.unlink()
    boot = plan.by_label("boot")
    assert boot is not None
    listing = subprocess.run(
        ["mdir", "-b", "-i", f"{image}@@{boot.offset}", "::/avobuild"],
        capture_output=True,
        text=True,
        check=True,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert "grubenv" in listing
    # rebuilt from the same inputs: the same bytes
    again = tmp_path / "again"
    avobuild_cli("image", product.recipe, "-o", again)
    assert next(again.glob("*.img")).read_bytes() == image.read_bytes()


def test_every_layout_key_is_documented() -> None:
    """Each key load_layout reads appears in a key table of docs/layouts.md."""
    source = (REPO / "avobuild" / "model" / "layout.py").read_text()
    keys = set(
        re.findall(
            r"\.(?:string|optional_string|enum|optional_enum|integer|boolean|size|optional_size|path_value|untyped)"
            r'\(\s*"([a-z-]+)"',
            source,
        )
    )
    keys |= set(
        re.findall(r'_(?:byte_offset|optional_uuid|existing_file)\(\w+, "([a-z-]+)"', source)
    )
    assert {"table", "extended-partition", "signature", "offset", "file", "attributes"} <= keys
    docs = (REPO / "docs" / "layouts.md").read_text()
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", docs, flags=re.MULTILINE))
    assert keys <= documented, sorted(keys - documented)
