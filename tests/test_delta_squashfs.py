"""Squashfs-aware deltas (docs/delta-format.md, section 8) on real squashfs images: seeded
trees of the host's own ELF files (recompiled, patched, grown, renamed) and small text files
(packed into fragment blocks), built with avobuild's mksquashfs builder.

Oracles: unsquashfs's extraction for the reader; the new image's bytes for every applied
delta (the Python host applier, and the production shell applier on a simulated device);
the version 1 stream's size for the gain; the refusals of a wrong zstd version.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elf_edits import host_elf_files, recompile
from hostile_bundles import Ref, delta_draft
from test_differential import Product, Readers, product  # noqa: F401 - the device fixture

from avobuild.bundle.manifest import ImageRef
from avobuild.delta.apply import apply_delta_file
from avobuild.delta.encode import DeltaSummary, encode_delta
from avobuild.delta.squashfs import file_bytes, read_squashfs
from avobuild.delta.squashfs_encode import squashfs_images
from avobuild.errors import BundleError
from avobuild.fs.squashfs import build_squashfs
from avobuild.model.layout import Role
from avobuild.model.tree import TreeSource

ELF_FILES = host_elf_files(5)
pytestmark = pytest.mark.skipif(len(ELF_FILES) < 5, reason="needs five x86-64 ELF files")


def ref(path: Path) -> ImageRef:
    data = path.read_bytes()
    return ImageRef(len(data), hashlib.sha256(data).hexdigest())


def edited_text(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    for _ in range(5):
        words[rng.randrange(len(words))] = f"v{rng.randrange(1000)}"
    return " ".join(words)


def build_trees(root: Path, seed: int) -> tuple[Path, Path]:
    """old and new trees: ELF files, one edit each in the new one, a renamed library, a file
    only the new tree has, and small config files (fragments), half of them edited."""
    rng = random.Random(seed)
    old, new = root / "old", root / "new"
    for tree in (old, new):
        (tree / "usr" / "lib").mkdir(parents=True)
        (tree / "etc").mkdir()
    edits = ["recompiled", "patched", "grown", "renamed", "unchanged"]
    for index, (source, edit) in enumerate(zip(ELF_FILES, edits, strict=True)):
        data = source.read_bytes()
        name = f"lib{index}-{rng.randrange(1 << 32):08x}.so"
        (old / "usr" / "lib" / name).write_bytes(data)
        if edit == "recompiled":
            data = recompile(rng, data)
        elif edit == "patched":
            changed = bytearray(data)
            for _ in range(100):
                changed[rng.randrange(len(changed))] = rng.randrange(256)
            data = bytes(changed)
        elif edit == "grown":
            data = data + data[: rng.randrange(1000, 50_000)]
        elif edit == "renamed":
            name = f"lib{index}-{rng.randrange(1 << 32):08x}.so"
            data = recompile(rng, data)
        (new / "usr" / "lib" / name).write_bytes(data)
    words = [f"word{rng.randrange(500)}" for _ in range(4000)]
    for index in range(12):
        text = " ".join(rng.sample(words, 300)) + "\n"
        (old / "etc" / f"app{index}.conf").write_text(text)
        (new / "etc" / f"app{index}.conf").write_text(edited_text(rng, text) if index % 2 else text)
    (new / "etc" / "added.bin").write_bytes(rng.randbytes(20_000))
    return old, new


def build_image(tree: Path, image: Path) -> Path:
    build_squashfs(TreeSource.own_directory(tree), image, seed="s")
    return image


def build_pair(root: Path, seed: int) -> tuple[Path, Path, Path]:
    old_tree, new_tree = build_trees(root, seed)
    return (
        build_image(old_tree, root / "old.sqfs"),
        build_image(new_tree, root / "new.sqfs"),
        new_tree,
    )


def make_delta(root: Path, old: Path, new: Path, version: int = 2) -> tuple[Path, DeltaSummary]:
    stream = root / f"v{version}.delta"
    with stream.open("wb") as output:
        summary = encode_delta(old, ref(old), new, ref(new), output, version=version, threads=2)
    return stream, summary


def assert_rebuilds(streams: tuple[Path, ...], old: Path, new: Path, suffix: str) -> Path:
    """Each stream applied to `old` by the host applier gives `new`'s bytes; the last output."""
    output = old
    for stream in streams:
        output = old.with_name(f"{stream.stem}.applied{suffix}")
        apply_delta_file(stream, old, output)
        assert output.read_bytes() == new.read_bytes(), stream
    return output


def test_the_reader_gives_what_unsquashfs_extracts(tmp_path: Path) -> None:
    image, new, new_tree = build_pair(tmp_path, 1)
    extracted = tmp_path / "extracted"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", extracted, new], check=True)
    squash = read_squashfs(new)
    on_disk = {
        "/" + str(path.relative_to(extracted)) for path in extracted.rglob("*") if path.is_file()
    }
    assert set(squash.files) == on_disk
    assert squash.compression_level == 15
    assert squash.fragments, "the small files should share fragment blocks"
    with new.open("rb") as handle:
        for path, file in squash.files.items():
            assert file_bytes(squash, handle.fileno(), file) == (extracted / path[1:]).read_bytes()
    del image, new_tree


def test_a_squashfs_delta_recompresses_and_rebuilds_the_exact_target(tmp_path: Path) -> None:
    old, new, _ = build_pair(tmp_path, 2)
    v1, v1_summary = make_delta(tmp_path, old, new, version=1)
    v2, v2_summary = make_delta(tmp_path, old, new)
    data = v2.read_bytes()
    assert data.startswith(b"avobuild-delta 2\nsource ")
    assert re.search(rb"\ntarget [^\n]*\nzstd-version [1-9][0-9]*\n", data)
    assert v2_summary.op_counts["recompress"] >= 3
    assert v2_summary.stream_size < 0.5 * v1_summary.stream_size, (
        v2_summary.stream_size,
        v1_summary.stream_size,
    )
    output = assert_rebuilds((v1, v2), old, new, ".sqfs")
    # unsquashfs reads the rebuilt image back.
    listing = subprocess.run(["unsquashfs", "-l", output], capture_output=True, check=True)
    assert b"etc/added.bin" in listing.stdout


@pytest.mark.parametrize("seed", [3, 4])
def test_seeded_squashfs_edits_reproduce_the_target(tmp_path: Path, seed: int) -> None:
    old, new, _ = build_pair(tmp_path, seed)
    stream, summary = make_delta(tmp_path, old, new)
    assert summary.op_counts["recompress"] >= 1
    output = tmp_path / "out.sqfs"
    apply_delta_file(stream, old, output)
    assert output.read_bytes() == new.read_bytes()


def test_blocks_the_host_zstd_does_not_reproduce_stay_version_1(tmp_path: Path) -> None:
    """An image whose compressor options name another level than its blocks were made with:
    no block recompresses to its stored bytes, so none becomes a recompress op, and the
    delta still rebuilds the image."""
    old_tree, new_tree = build_trees(tmp_path, 5)
    images = []
    for tree in (old_tree, new_tree):
        image = tmp_path / f"{tree.name}.sqfs"
        subprocess.run(
            [
                *("mksquashfs", tree, image, "-comp", "zstd", "-Xcompression-level", "14"),
                *("-noappend", "-quiet", "-no-progress", "-all-root", "-no-xattrs"),
            ],
            check=True,
            capture_output=True,
        )
        data = bytearray(image.read_bytes())
        # The options: one uncompressed metadata block after the superblock, the level first.
        header, level = struct.unpack_from("<Hi", data, 96)
        assert header == 0x8004 and level == 14, (hex(header), level)
        struct.pack_into("<i", data, 98, 3)
        image.write_bytes(bytes(data))
        images.append(image)
    assert read_squashfs(images[1]).compression_level == 3
    stream, summary = make_delta(tmp_path, images[0], images[1])
    assert summary.op_counts["recompress"] == 0
    assert b"\nrecompress " not in stream.read_bytes()
    output = tmp_path / "out.sqfs"
    apply_delta_file(stream, images[0], output)
    assert output.read_bytes() == images[1].read_bytes()


def test_another_zstd_version_is_refused_before_writing(tmp_path: Path) -> None:
    old, new, _ = build_pair(tmp_path, 6)
    stream, _ = make_delta(tmp_path, old, new)
    data = stream.read_bytes()
    match = re.search(rb"\nzstd-version ([0-9]+)\n", data)
    assert match is not None
    other = int(match.group(1)) + 1
    bad = tmp_path / "other.delta"
    bad.write_bytes(data[: match.start(1)] + b"%d" % other + data[match.end(1) :])
    output = tmp_path / "out.sqfs"
    wanted = f"{other // 10000}.{other // 100 % 100}.{other % 100}"
    with pytest.raises(BundleError, match=rf"with zstd {re.escape(wanted)}, this host's zstd"):
        apply_delta_file(bad, old, output)
    assert not output.exists()


def _slot(disk: Path, offset: int, size: int) -> bytes:
    with disk.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def test_the_device_applier_rebuilds_the_squashfs_slot(
    product: Product,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """The production shell applier on a simulated device (busybox, zstd, bspatch) and the
    Python installer, from a signed delta bundle between two squashfs slot images: slot B
    ends up holding the new image; a zstd-version other than the device's is refused by
    both, with slot B untouched."""
    old, new, _ = build_pair(tmp_path, 7)
    stream, summary = make_delta(tmp_path, old, new)
    assert summary.op_counts["recompress"] >= 1
    slot_a = product.plan.by_role(Role.SYSTEM_A)
    slot_b = product.plan.by_role(Role.SYSTEM_B)
    assert slot_a is not None and slot_b is not None
    assert max(old.stat().st_size, new.stat().st_size) <= slot_a.size
    source, target = ref(old), ref(new)
    data = stream.read_bytes()
    match = re.search(rb"\nzstd-version ([0-9]+)\n", data)
    assert match is not None
    wrong = data[: match.start(1)] + b"%d" % (int(match.group(1)) + 100) + data[match.end(1) :]
    for name, payload, accepted in (("wrong-zstd", wrong, False), ("valid", data, True)):
        readers = Readers(product, tmp_path / name)
        for disk in (readers.python_disk, readers.shell_disk):
            with disk.open("r+b") as handle:
                handle.seek(slot_a.offset)
                handle.write(old.read_bytes())
        before = _slot(readers.shell_disk, slot_b.offset, slot_b.size)
        bundle = tmp_path / f"{name}.avb"
        bundle.write_bytes(
            delta_draft(
                payload,
                Ref(source.size, source.sha256),
                Ref(target.size, target.sha256),
                (product.context.trusted,),
            ).render()
        )
        python, shell = readers.python(bundle), readers.shell(bundle)
        assert (python.accepted, shell.accepted) == (accepted, accepted), (
            python.detail,
            shell.detail,
        )
        for disk in (readers.python_disk, readers.shell_disk):
            written = _slot(disk, slot_b.offset, slot_b.size)
            if accepted:
                assert written[: target.size] == new.read_bytes()
            else:
                assert written == before
        if not accepted:
            assert "zstd" in python.detail and "zstd" in shell.detail
        shutil.rmtree(tmp_path / name)


def test_the_reader_refuses_damaged_images_naming_the_offset(tmp_path: Path) -> None:
    """Offsets out of range are refused with a BundleError naming the image and the byte
    offset; a squashfs of another compression is left to version 1."""
    _, new, _ = build_pair(tmp_path, 8)
    data = new.read_bytes()
    inode_start, directory_start = struct.unpack_from("<QQ", data, 64)
    fragment_start = struct.unpack_from("<Q", data, 80)[0]
    damaged = {
        "truncated": (data[: len(data) // 2], r"squashfs byte offset \d+: "),
        "bytes-used-past-the-end": (
            data[:40] + struct.pack("<Q", len(data) + 1) + data[48:],
            "squashfs byte offset 64: the inode and directory tables are not inside the image",
        ),
        "fragment-pointer-past-its-index": (
            data[:fragment_start]
            + struct.pack("<Q", fragment_start + 8)
            + data[fragment_start + 8 :],
            f"squashfs byte offset {fragment_start}: fragment table block at",
        ),
        "metadata-block-size": (
            data[:inode_start] + struct.pack("<H", 0x7FFF) + data[inode_start + 2 :],
            f"squashfs byte offset {inode_start}: metadata block of 32767 bytes",
        ),
    }
    assert directory_start > inode_start
    for name, (image, message) in damaged.items():
        path = tmp_path / f"{name}.sqfs"
        path.write_bytes(image)
        with pytest.raises(BundleError, match=message):
            read_squashfs(path)
    gzip = tmp_path / "gzip.sqfs"
    gzip.write_bytes(data[:20] + struct.pack("<H", 1) + data[22:])
    with pytest.raises(BundleError, match="compression 1, expected zstd"):
        read_squashfs(gzip)
    assert squashfs_images(gzip, new) is None


def test_a_squashfs_delta_is_reproducible(tmp_path: Path) -> None:
    """The same images give the same stream bytes, whatever the number of workers."""
    old, new, _ = build_pair(tmp_path, 9)
    streams = []
    for threads in (1, 2):
        stream = tmp_path / f"{threads}.delta"
        with stream.open("wb") as output:
            encode_delta(old, ref(old), new, ref(new), output, threads=threads)
        streams.append(stream.read_bytes())
    assert b"\nrecompress " in streams[0]
    assert streams[0] == streams[1]
