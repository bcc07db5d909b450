"""File-aware deltas between erofs slot images (`fs.erofs_map`, docs/delta-format.md §7).

Real images built by mkfs.erofs (avobuild's builder, and mkfs.erofs's chunk-based layout)
from seeded trees of the host's own ELF files (recompiled, patched, grown, renamed) and
small text files (inline tails).

Oracles: `dump.erofs -e`'s extents for every file of the map, and the file's own bytes read
back at the mapped blocks; the new image's bytes for every applied delta (the Python host
applier, and the production shell applier on a simulated device); the version 1 stream's
size for the gain; `BuildError`, never another exception, for damaged images.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from elf_edits import host_elf_files, recompile
from hostile_bundles import Ref, delta_draft
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_delta_squashfs import assert_rebuilds, build_trees, make_delta, ref
from test_differential import Product, Readers, product  # noqa: F401 - the device fixture

from avobuild.delta.files import file_pairing
from avobuild.errors import BuildError
from avobuild.fs.erofs import build_erofs
from avobuild.fs.erofs_map import erofs_block_size, erofs_file_map
from avobuild.model.layout import Role
from avobuild.model.tree import TreeSource

ELF_FILES = host_elf_files(5)
pytestmark = pytest.mark.skipif(len(ELF_FILES) < 5, reason="needs five x86-64 ELF files")
_EXTENT = re.compile(rb"^\s*\d+:\s+(\d+)\.\.\s*(\d+) \|\s*(\d+) :\s+(\d+)\.\.\s*(\d+) \|", re.M)


def build_image(tree: Path, image: Path, *extra: str) -> Path:
    """avobuild's reproducible erofs builder, or mkfs.erofs itself with `extra` options."""
    if extra:
        subprocess.run(
            ["mkfs.erofs", "--quiet", "-T0", "--all-root", "-x", "-1", *extra, image, tree],
            check=True,
        )
    else:
        build_erofs(TreeSource.own_directory(tree), image, seed="e")
    return image


def build_pair(root: Path, seed: int, *extra: str) -> tuple[Path, Path, Path]:
    old_tree, new_tree = build_trees(root, seed)
    return (
        build_image(old_tree, root / "old.erofs", *extra),
        build_image(new_tree, root / "new.erofs", *extra),
        new_tree,
    )


def dump_extents(image: Path, path: str) -> list[tuple[int, int, int]]:
    """(logical offset, physical offset, length) of a file's extents, as dump.erofs prints."""
    listing = subprocess.run(
        ["dump.erofs", "-e", f"--path=/{path}", image], capture_output=True, check=True
    ).stdout
    return [(int(match[1]), int(match[4]), int(match[3])) for match in _EXTENT.finditer(listing)]


@pytest.mark.parametrize("layout", ["plain", "chunks"])
def test_the_map_matches_dump_erofs_and_the_files_bytes(tmp_path: Path, layout: str) -> None:
    extra = ("--chunksize=8192",) if layout == "chunks" else ()
    _, image, tree = build_pair(tmp_path, 11, *extra)
    mapped = erofs_file_map(image)
    assert mapped.block_size == erofs_block_size(image) == 4096
    on_disk = {str(path.relative_to(tree)) for path in tree.rglob("*") if path.is_file()}
    assert set(mapped.files) == on_disk
    size = mapped.block_size
    fd = os.open(image, os.O_RDONLY)
    try:
        for path, blocks in mapped.files.items():
            data = (tree / path).read_bytes()
            assert blocks.size == len(data), path
            # dump.erofs lists the inline tail too, at an offset inside the metadata block:
            # every block-aligned extent it lists is the file's blocks, and only those.
            dumped = {
                logical // size + index: physical // size + index
                for logical, physical, length in dump_extents(image, path)
                if physical % size == 0
                for index in range(-(-length // size))
            }
            ours = {}
            for logical, physical, count in blocks.extents:
                for index in range(count):
                    ours[logical + index] = physical + index
                start = logical * size
                read = os.pread(fd, count * size, physical * size)[: max(0, len(data) - start)]
                assert read == data[start : start + count * size], path
            assert ours == dumped, path
    finally:
        os.close(fd)


def recompiled_pair(root: Path, seed: int, *extra: str) -> tuple[Path, Path]:
    """Images of the ELF files, each recompiled three times in the new one."""
    rng = random.Random(seed)
    for tree in ("old", "new"):
        (root / tree / "usr" / "lib").mkdir(parents=True)
    for index, source in enumerate(ELF_FILES):
        data = source.read_bytes()
        (root / "old" / "usr" / "lib" / f"lib{index}.so").write_bytes(data)
        for _ in range(3):
            data = recompile(rng, data)
        (root / "new" / "usr" / "lib" / f"lib{index}.so").write_bytes(data)
    return (
        build_image(root / "old", root / "old.erofs", *extra),
        build_image(root / "new", root / "new.erofs", *extra),
    )


def test_an_erofs_delta_pairs_files_and_rebuilds_the_exact_target(tmp_path: Path) -> None:
    old, new = recompiled_pair(tmp_path, 12)
    pairing = file_pairing(old, old.stat().st_size, new)
    assert pairing is not None and pairing.paired == len(ELF_FILES)
    v1, v1_summary = make_delta(tmp_path, old, new, version=1)
    v2, v2_summary = make_delta(tmp_path, old, new)
    assert v1.read_bytes().startswith(b"avobuild-delta 1\n")
    assert v2.read_bytes().startswith(b"avobuild-delta 2\n")
    assert v2_summary.op_counts["bspatch"] >= 3
    # Small files laid out in the same order: version 1 already finds most of each old
    # file; bsdiff of the recompiled code still wins (0.90-0.95 x on seeds 1-3).
    assert v2_summary.stream_size < 0.97 * v1_summary.stream_size, (
        v2_summary.stream_size,
        v1_summary.stream_size,
    )
    output = assert_rebuilds((v1, v2), old, new, ".erofs")
    subprocess.run(["fsck.erofs", output], check=True, capture_output=True)


@pytest.mark.parametrize("seed", [13, 14])
def test_seeded_chunk_based_edits_reproduce_the_target(tmp_path: Path, seed: int) -> None:
    old, new = recompiled_pair(tmp_path, seed, "--chunksize=16384")
    stream, summary = make_delta(tmp_path, old, new)
    assert stream.read_bytes().startswith(b"avobuild-delta 2\n")
    assert summary.op_counts["bspatch"] >= 1
    assert_rebuilds((stream,), old, new, ".erofs")


def test_an_erofs_delta_is_reproducible(tmp_path: Path) -> None:
    old, new, _ = build_pair(tmp_path, 15)
    streams = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        streams.append(make_delta(tmp_path / name, old, new)[0].read_bytes())
    assert streams[0] == streams[1]


def _slot(disk: Path, offset: int, size: int) -> bytes:
    with disk.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def test_the_device_applier_rebuilds_the_erofs_slot(
    product: Product,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """The production shell applier on a simulated device (busybox, zstd, bspatch) and the
    Python installer, from a signed delta bundle between two erofs slot images."""
    old, new, _ = build_pair(tmp_path, 16)
    stream, summary = make_delta(tmp_path, old, new)
    assert summary.op_counts["bspatch"] >= 1
    slot_a = product.plan.by_role(Role.SYSTEM_A)
    slot_b = product.plan.by_role(Role.SYSTEM_B)
    assert slot_a is not None and slot_b is not None
    assert max(old.stat().st_size, new.stat().st_size) <= slot_a.size
    source, target = ref(old), ref(new)
    readers = Readers(product, tmp_path / "device")
    for disk in (readers.python_disk, readers.shell_disk):
        with disk.open("r+b") as handle:
            handle.seek(slot_a.offset)
            handle.write(old.read_bytes())
    bundle = tmp_path / "erofs.avb"
    bundle.write_bytes(
        delta_draft(
            stream.read_bytes(),
            Ref(source.size, source.sha256),
            Ref(target.size, target.sha256),
            (product.context.trusted,),
        ).render()
    )
    python, shell = readers.python(bundle), readers.shell(bundle)
    assert python.accepted and shell.accepted, (python.detail, shell.detail)
    for disk in (readers.python_disk, readers.shell_disk):
        assert _slot(disk, slot_b.offset, target.size) == new.read_bytes()


def test_damaged_images_are_refused_naming_the_offset(tmp_path: Path) -> None:
    _, image, _ = build_pair(tmp_path, 17)
    data = bytearray(image.read_bytes())
    broken = tmp_path / "broken.erofs"
    # The root directory's node id pointing past the image.
    damaged = bytearray(data)
    damaged[1024 + 14 : 1024 + 16] = (0xFFFF).to_bytes(2, "little")
    broken.write_bytes(bytes(damaged[: 64 * 4096]))
    with pytest.raises(BuildError, match=r"inode 65535 at byte offset \d+ .* past the image"):
        erofs_file_map(broken)
    # A block size the format does not have.
    damaged = bytearray(data)
    damaged[1024 + 12] = 20
    broken.write_bytes(bytes(damaged))
    with pytest.raises(BuildError, match=r"block size 2\^20 at byte offset 1036"):
        erofs_file_map(broken)
    assert file_pairing(broken, broken.stat().st_size, image) is None


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("erofs-fuzz")
    tree = root / "tree"
    rng = random.Random(18)
    for index in range(6):
        directory = tree / f"d{index % 3}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{index}").write_bytes(rng.randbytes(rng.choice([100, 5000, 9000])))
    image = build_image(tree, root / "small.erofs")
    return image.read_bytes()


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_fuzzed_images_map_or_raise_build_error(
    small_image: bytes, tmp_path: Path, data: st.DataObject
) -> None:
    """Flipped bytes in the superblock and metadata, and truncation: the reader gives a map
    or a BuildError, never another exception or a hang."""
    damaged = bytearray(small_image)
    metadata_end = min(len(damaged), 3 * 4096)
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.integers(1024, metadata_end - 1))
        damaged[where] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1040, len(damaged)))
    image = tmp_path / "fuzzed.erofs"
    image.write_bytes(bytes(damaged[:cut]))
    try:
        mapped = erofs_file_map(image)
    except BuildError:
        return
    size = image.stat().st_size
    for blocks in mapped.files.values():
        for _, physical, count in blocks.extents:
            assert (physical + count) * mapped.block_size <= size
