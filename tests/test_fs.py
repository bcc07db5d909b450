"""Filesystem builders: build real images from a seeded tree and read them back with the tools.

Every image is checked by the format's own checker (e2fsck, fsck.vfat, unsquashfs, fsck.erofs)
and its content, modes, symlinks and owners compared with the source tree. Reproducibility is
tested the hard way: the second build reads a copy of the tree made in reverse order, with
other mtimes, owners and inode numbers, a wall-clock second later.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from avobuild.errors import BuildError, ToolFailed
from avobuild.fs import (
    EntryKind,
    FsEntry,
    build_filesystem,
    deterministic_uuid,
    list_erofs_tree,
    list_ext4_tree,
    list_squashfs_tree,
    list_vfat_tree,
    read_erofs_file,
    read_ext4_file,
    read_squashfs_file,
    read_vfat_file,
    scan_source_tree,
    validate_label,
    write_vfat_file,
)
from avobuild.fs.erofs import extract_erofs
from avobuild.model.layout import FsType
from avobuild.run import run, run_text, source_date_epoch

MiB = 1 << 20
SIZES = {FsType.EXT4: 24 * MiB, FsType.VFAT: 24 * MiB, FsType.SQUASHFS: None, FsType.EROFS: None}
LABELS = {FsType.EXT4: "rootfs", FsType.VFAT: "ESP", FsType.SQUASHFS: "", FsType.EROFS: ""}
# Owner for source files when the suite runs as root; otherwise the runner's own uid (not 0)
# is what the builders must hide.
FOREIGN_OWNER = (1234, 5678)
TMPFS = Path("/dev/shm")


def make_source_tree(root: Path, seed: int, *, fat: bool = False) -> None:
    """A seeded tree: nested dirs, files from empty to a few MB, odd names, modes, links.

    `fat` leaves out what FAT cannot hold: symlinks and names with a double quote.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True)
    root.chmod(0o755)
    dirs = [root]
    for index in range(8):
        directory = rng.choice(dirs) / f"dir{index}"
        directory.mkdir()
        directory.chmod(rng.choice([0o755, 0o750, 0o700]))
        dirs.append(directory)
    (root / "empty-dir").mkdir()
    files: list[Path] = []
    for index in range(30):
        path = rng.choice(dirs) / f"file{index}.bin"
        size = rng.choice([0, 1, 59, 60, 4095, 4096, 4097, 65_536, rng.randrange(1, 300_000)])
        path.write_bytes(rng.randbytes(size))
        path.chmod(rng.choice([0o644, 0o755, 0o600, 0o444, 0o4755, 0o2750]))
        files.append(path)
    for index, size in enumerate((2 * MiB + 17, 3 * MiB)):
        path = rng.choice(dirs) / f"big{index}.img"
        path.write_bytes(rng.randbytes(size))
        files.append(path)
    (root / "zeros.bin").write_bytes(bytes(MiB))
    (root / "with space.txt").write_text("a name with a space\n")
    (rng.choice(dirs) / "ünïcödé-名前.txt").write_text("utf-8 name\n")
    (root / "UPPER.TXT").write_text("upper case\n")
    os.link(files[0], root / "hardlink.bin")
    if not fat:
        (root / 'quote"d name').write_text("double quote\n")
        (root / "link-to-file").symlink_to(files[1].relative_to(root))
        (root / "link-to-dir").symlink_to("dir0")
        (root / "dangling").symlink_to("does/not/exist")
        (root / "absolute").symlink_to("/etc/hostname")
        (root / "long-link").symlink_to("/" + "/".join(f"segment{n}" for n in range(12)))
    if os.geteuid() == 0:
        for path in [*files, *dirs[1:]]:
            os.chown(path, *FOREIGN_OWNER)


def copy_tree_reversed(
    source: Path, destination: Path, copied: dict[int, Path] | None = None
) -> None:
    """Copy `source` creating entries in reverse order, with other mtimes.

    Readdir order, inode numbers, ctimes and mtimes all differ from the original; only what
    an image must hold (names, bytes, modes, link targets, hard links) is the same.
    """
    copied = {} if copied is None else copied
    destination.mkdir()
    names = sorted(os.listdir(source), reverse=True)
    for name in names:
        origin, copy = source / name, destination / name
        if origin.is_symlink():
            copy.symlink_to(os.readlink(origin))
        elif origin.is_dir():
            copy_tree_reversed(origin, copy, copied)
        elif origin.stat().st_ino in copied:
            os.link(copied[origin.stat().st_ino], copy)
        else:
            copy.write_bytes(origin.read_bytes())
            copied[origin.stat().st_ino] = copy
        if not copy.is_symlink():
            copy.chmod(stat.S_IMODE(origin.lstat().st_mode))
        os.utime(copy, (123_456_789, 987_654_321), follow_symlinks=False)
    destination.chmod(stat.S_IMODE(source.stat().st_mode))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_image(fstype: FsType, image: Path) -> None:
    """Run the format's own checker; each raises ToolFailed on a damaged image."""
    if fstype is FsType.EXT4:
        run(["e2fsck", "-fn", image])
    elif fstype is FsType.VFAT:
        run(["fsck.vfat", "-n", image])
    elif fstype is FsType.SQUASHFS:
        assert "Found a valid SQUASHFS 4:0 superblock" in run_text(["unsquashfs", "-s", image])
    else:
        run(["fsck.erofs", image])


def list_tree(fstype: FsType, image: Path) -> dict[str, FsEntry]:
    if fstype is FsType.EXT4:
        return list_ext4_tree(image)
    if fstype is FsType.VFAT:
        return list_vfat_tree(image)
    if fstype is FsType.SQUASHFS:
        return list_squashfs_tree(image)
    return list_erofs_tree(image)


def fat_view(entries: dict[str, FsEntry]) -> dict[str, FsEntry]:
    """What a FAT image of `entries` holds: no permissions, so mode 0755 throughout."""
    return {path: FsEntry(entry.kind, 0o755, entry.size) for path, entry in entries.items()}


def build(fstype: FsType, source: Path | None, output: Path, *, seed: str = "seed-1") -> Path:
    build_filesystem(fstype, source, output, SIZES[fstype], label=LABELS[fstype], seed=seed)
    return output


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("trees")
    make_source_tree(base / "full", 7)
    make_source_tree(base / "fat", 7, fat=True)
    return {"full": base / "full", "fat": base / "fat"}


def tree_for(fstype: FsType, trees: dict[str, Path]) -> Path:
    return trees["fat"] if fstype is FsType.VFAT else trees["full"]


# --- identifiers and labels ---


def test_deterministic_uuid_is_stable_and_distinct_per_seed_and_purpose() -> None:
    first = deterministic_uuid("product/rootfs", "ext4-uuid")
    assert first == deterministic_uuid("product/rootfs", "ext4-uuid")
    assert first != deterministic_uuid("product/rootfs2", "ext4-uuid")
    assert first != deterministic_uuid("product/rootfs", "ext4-hash-seed")
    assert first.version == 8
    assert first.variant == "specified in RFC 4122"


@pytest.mark.parametrize(
    ("fstype", "label", "message"),
    [
        (FsType.EXT4, "a-label-of-17-by", None),
        (FsType.EXT4, "a-label-of-17-byt", "at most 16 bytes"),
        (FsType.EXT4, "ünïcödé-lábél", "at most 16 bytes"),
        (FsType.VFAT, "ESP", None),
        (FsType.VFAT, "BOOT_A 1", None),
        (FsType.VFAT, "esp", "upper case"),
        (FsType.VFAT, "TWELVE_CHARS", "at most 11"),
        (FsType.VFAT, "A/B", "A-Z, 0-9"),
        (FsType.SQUASHFS, "anything", None),
    ],
)
def test_labels_are_validated(fstype: FsType, label: str, message: str | None) -> None:
    if message is None:
        validate_label(fstype, label)
    else:
        with pytest.raises(BuildError, match=message):
            validate_label(fstype, label)


def test_bad_label_fails_the_build_before_any_tool_runs(tmp_path: Path) -> None:
    output = tmp_path / "esp.img"
    with pytest.raises(BuildError, match=r"FAT label 'boot'.*e\.g\. 'BOOT'"):
        build_filesystem(FsType.VFAT, None, output, 8 * MiB, label="boot", seed="s")
    assert not output.exists()


def test_fixed_size_formats_need_a_size(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="needs a size"):
        build_filesystem(FsType.EXT4, None, tmp_path / "x.img", None, label="", seed="s")


# --- content ---


@pytest.mark.parametrize("fstype", list(FsType))
def test_image_holds_the_tree_and_passes_its_checker(
    fstype: FsType, trees: dict[str, Path], tmp_path: Path
) -> None:
    source = tree_for(fstype, trees)
    messages: list[str] = []
    image = tmp_path / f"image.{fstype}"
    build_filesystem(
        fstype,
        source,
        image,
        SIZES[fstype],
        label=LABELS[fstype],
        seed="seed-1",
        progress=messages.append,
    )
    assert messages and messages[-1].startswith(f"built {image.name}")
    if SIZES[fstype] is not None:
        assert image.stat().st_size == SIZES[fstype]
    check_image(fstype, image)

    expected = scan_source_tree(source)
    listed = list_tree(fstype, image)
    assert listed == (fat_view(expected) if fstype is FsType.VFAT else expected)
    assert all(entry.uid == 0 and entry.gid == 0 for entry in listed.values())

    files = [path for path, entry in expected.items() if entry.kind is EntryKind.FILE]
    if fstype is FsType.EROFS:
        extracted = tmp_path / "extracted"
        extract_erofs(image, extracted)
        contents = {path: (extracted / path).read_bytes() for path in files}
        contents[files[0]] = read_erofs_file(image, files[0])
    elif fstype is FsType.EXT4:
        contents = {path: read_ext4_file(image, path) for path in files}
    elif fstype is FsType.VFAT:
        contents = {path: read_vfat_file(image, 0, path) for path in files}
    else:
        contents = {path: read_squashfs_file(image, path) for path in files}
    for path in files:
        assert contents[path] == (source / path).read_bytes(), path


def test_ext4_root_inode_and_every_timestamp_are_normalised(
    trees: dict[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "tree"
    shutil.copytree(trees["full"], source, symlinks=True)
    source.chmod(0o750)
    image = build(FsType.EXT4, source, tmp_path / "root.ext4")
    epoch = f"{source_date_epoch():08x}"
    for path in ["/", "/dir0", "/link-to-dir", "/long-link", "/with space.txt"]:
        report = run_text(["debugfs", "-R", f'stat "{path}"', image])
        times = re.findall(r"^ *(?:a|c|m|cr)time: 0x([0-9a-f]+):([0-9a-f]+)", report, re.M)
        assert times == [(epoch, "00000000")] * 4, (path, report)
        assert re.search(r"User: +0 +Group: +0 ", report), report
    assert "Mode:  0750" in run_text(["debugfs", "-R", "stat /", image])


def test_vfat_entries_are_dated_at_the_build_epoch(trees: dict[str, Path], tmp_path: Path) -> None:
    image = build(FsType.VFAT, trees["fat"], tmp_path / "esp.img")
    day = time.strftime("%Y-%m-%d", time.gmtime(source_date_epoch()))
    listing = run_text(["mdir", "-/", "-i", image, "::/"])
    dated = [line for line in listing.splitlines() if re.search(r"\d{4}-\d\d-\d\d", line)]
    assert dated and all(day in line for line in dated), listing


@pytest.mark.parametrize("fstype", list(FsType))
def test_empty_filesystem(fstype: FsType, tmp_path: Path) -> None:
    image = build(fstype, None, tmp_path / f"empty.{fstype}")
    check_image(fstype, image)
    assert list_tree(fstype, image) == {}


def test_vfat_refuses_fifos(tmp_path: Path) -> None:
    # The other formats store special files (tests/test_rootfs_inputs.py); FAT cannot.
    source = tmp_path / "tree"
    source.mkdir()
    os.mkfifo(source / "pipe")
    with pytest.raises(BuildError, match="pipe: is a fifo; FAT cannot hold special files"):
        build(FsType.VFAT, source, tmp_path / "out.vfat")


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["Readme.txt", "README.TXT"], "case-insensitive"),
        (["what?.txt"], "not a valid FAT long name"),
        (["trailing."], "not a valid FAT long name"),
    ],
)
def test_vfat_refuses_names_fat_cannot_hold(names: list[str], message: str, tmp_path: Path) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    for name in names:
        (source / name).write_text(name)
    with pytest.raises(BuildError, match=message):
        build(FsType.VFAT, source, tmp_path / "esp.img")


def test_vfat_refuses_symlinks(tmp_path: Path) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    (source / "link").symlink_to("target")
    with pytest.raises(BuildError, match="FAT cannot hold symlinks"):
        build(FsType.VFAT, source, tmp_path / "esp.img")


# --- reproducibility ---


@pytest.mark.slow
def test_builds_are_bit_identical_across_copies_mtimes_and_wall_clock(
    trees: dict[str, Path], tmp_path: Path
) -> None:
    first: dict[FsType, str] = {}
    for fstype in FsType:
        first[fstype] = sha256(build(fstype, tree_for(fstype, trees), tmp_path / f"a.{fstype}"))
    # On ext4 (and most disk filesystems) readdir order follows a name hash, so a copy made
    # in another order lists the same; tmpfs lists in creation order, so the copy goes there.
    scratch = Path(tempfile.mkdtemp(dir=TMPFS if os.access(TMPFS, os.W_OK) else tmp_path))
    try:
        copies = {name: scratch / f"copy-{name}" for name in trees}
        for name, tree in trees.items():
            copy_tree_reversed(tree, copies[name])
        time.sleep(1.1)  # a wall-clock second later, so any leaked "now" shows up
        for fstype in FsType:
            source = copies["fat"] if fstype is FsType.VFAT else copies["full"]
            again = build(fstype, source, tmp_path / f"b.{fstype}")
            assert sha256(again) == first[fstype], fstype
    finally:
        shutil.rmtree(scratch)


def test_build_epoch_changes_the_image(
    trees: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    before = sha256(build(FsType.EXT4, trees["full"], tmp_path / "a.ext4"))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000002")
    after = sha256(build(FsType.EXT4, trees["full"], tmp_path / "b.ext4"))
    assert before != after


def _field(pattern: str, report: str) -> str:
    found = re.search(pattern, report)
    assert found is not None, report
    return found.group(1)


def _ext4_uuid(image: Path) -> str:
    return _field(r"Filesystem UUID: +(\S+)", run_text(["debugfs", "-R", "stats", image]))


def _vfat_volume_id(image: Path) -> str:
    return _field(r"Serial Number is (\S+)", run_text(["mdir", "-i", image, "::/"]))


def _erofs_uuid(image: Path) -> str:
    return _field(r"Filesystem UUID: +(\S+)", run_text(["dump.erofs", "-s", image]))


@pytest.mark.parametrize(
    ("fstype", "identify"),
    [(FsType.EXT4, _ext4_uuid), (FsType.VFAT, _vfat_volume_id), (FsType.EROFS, _erofs_uuid)],
)
def test_seed_decides_the_filesystem_uuid(
    fstype: FsType, identify: Callable[[Path], str], tmp_path: Path
) -> None:
    one = identify(build(fstype, None, tmp_path / "one", seed="product/a"))
    same = identify(build(fstype, None, tmp_path / "same", seed="product/a"))
    other = identify(build(fstype, None, tmp_path / "other", seed="product/b"))
    assert one == same != other
    if fstype is FsType.EXT4:
        assert one == str(deterministic_uuid("product/a", "ext4-uuid"))


# --- trees that do not fit ---


@pytest.mark.parametrize("fstype", [FsType.EXT4, FsType.VFAT])
def test_tree_too_big_for_the_partition(fstype: FsType, tmp_path: Path) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    (source / "payload.bin").write_bytes(random.Random(3).randbytes(3 * MiB))
    with pytest.raises(BuildError) as raised:
        build_filesystem(
            fstype, source, tmp_path / "small.img", 2 * MiB, label=LABELS[fstype], seed="s"
        )
    message = str(raised.value)
    assert f"({3 * MiB} bytes of files in 1 entries) does not fit" in message
    assert f"{2 * MiB}-byte" in message and "make the partition bigger" in message


def test_ext4_out_of_inodes_is_reported_as_not_fitting(tmp_path: Path) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    for index in range(200):
        (source / f"f{index}").touch()
    with pytest.raises(BuildError, match=r"does not fit.*Could not allocate inode"):
        build_filesystem(FsType.EXT4, source, tmp_path / "x.img", 2 * MiB, label="", seed="s")


@pytest.mark.parametrize("fstype", [FsType.SQUASHFS, FsType.EROFS])
def test_self_sizing_image_larger_than_its_budget(
    fstype: FsType, trees: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(BuildError, match="larger than 1048576 bytes"):
        build_filesystem(fstype, trees["full"], tmp_path / "x.img", MiB, label="", seed="s")


# --- filesystems inside a disk image ---


def _embed(image: Path, disk: Path, offset: int, tail: bytes) -> bytes:
    """Write `image` at `offset` in a new `disk` between seeded bytes; return the head bytes."""
    head = random.Random(5).randbytes(offset)
    with disk.open("wb") as handle:
        handle.write(head)
        handle.write(image.read_bytes())
        handle.write(tail)
    return head


def test_vfat_file_written_and_read_inside_a_disk_image(
    trees: dict[str, Path], tmp_path: Path
) -> None:
    esp = build(FsType.VFAT, trees["fat"], tmp_path / "esp.img")
    disk, offset, tail = tmp_path / "disk.img", 3 * MiB, random.Random(6).randbytes(MiB)
    head = _embed(esp, disk, offset, tail)

    write_vfat_file(disk, offset, "/avobuild/grubenv", b"# GRUB Environment Block\n" * 40)
    write_vfat_file(disk, offset, "/avobuild/grubenv", b"shorter\n")
    write_vfat_file(disk, offset, "UPPER.TXT", b"replaced\n")
    assert read_vfat_file(disk, offset, "/avobuild/grubenv") == b"shorter\n"
    assert read_vfat_file(disk, offset, "/UPPER.TXT") == b"replaced\n"

    data = disk.read_bytes()
    assert data[:offset] == head and data[offset + esp.stat().st_size :] == tail
    partition = tmp_path / "partition.img"
    partition.write_bytes(data[offset : offset + esp.stat().st_size])
    check_image(FsType.VFAT, partition)
    listed = list_vfat_tree(disk, offset)
    assert listed["avobuild/grubenv"] == FsEntry(EntryKind.FILE, 0o755, len(b"shorter\n"))
    assert listed == list_vfat_tree(partition)


def test_vfat_read_of_a_missing_file_names_it(tmp_path: Path) -> None:
    image = build(FsType.VFAT, None, tmp_path / "esp.img")
    with pytest.raises(ToolFailed, match="nope"):
        read_vfat_file(image, 0, "/avobuild/nope")


@pytest.mark.parametrize(("size", "fat_type"), [(24 * MiB, b"FAT16   "), (64 * MiB, b"FAT32   ")])
def test_vfat_is_fat32_from_64_mib(size: int, fat_type: bytes, tmp_path: Path) -> None:
    image = tmp_path / "esp.img"
    build_filesystem(FsType.VFAT, None, image, size, label="ESP", seed="s")
    boot_sector = image.read_bytes()[:512]
    assert fat_type in (boot_sector[0x36:0x3E], boot_sector[0x52:0x5A])
    check_image(FsType.VFAT, image)


def test_ext4_readers_work_inside_a_disk_image(trees: dict[str, Path], tmp_path: Path) -> None:
    image = build(FsType.EXT4, trees["full"], tmp_path / "root.ext4")
    disk, offset = tmp_path / "disk.img", 2 * MiB
    _embed(image, disk, offset, b"")
    run(["e2fsck", "-fn", f"{disk}?offset={offset}"])
    assert list_ext4_tree(disk, offset) == list_ext4_tree(image)
    assert read_ext4_file(disk, "with space.txt", offset) == b"a name with a space\n"
    with pytest.raises(BuildError, match="File not found"):
        read_ext4_file(disk, "missing", offset)
