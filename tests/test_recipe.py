"""Recipes and layouts: parsed into frozen objects, every mistake named by file and key."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest
from conftest import REPO, Product, write_product

from avobuild.binaries.elf import check_binaries, check_kernel, find_foreign_binaries
from avobuild.disk.plan import plan_layout
from avobuild.errors import BuildError, RecipeError
from avobuild.model.layout import Role, Slot, load_layout
from avobuild.model.recipe import Architecture, load_recipe


def test_product_recipe_loads(product: Product) -> None:
    recipe = load_recipe(product.recipe)
    assert (recipe.name, recipe.version, recipe.compatible) == (
        "testprod",
        "1.0.0",
        "testprod-x86_64",
    )
    assert recipe.architecture is Architecture.X86_64
    assert recipe.rootfs.path == product.rootfs.resolve()
    assert recipe.kernel == product.kernel.resolve()
    assert [ext.name for ext in recipe.extensions] == ["tools"]
    assert recipe.rootfs_files[0].mode == 0o755
    assert plan_layout(recipe.layout).slot_partition("rootfs", Slot.B).spec.label == "system-b"  # type: ignore[union-attr]


def test_shipped_layout_plan() -> None:
    layout = load_layout(REPO / "layouts" / "x86_64-efi-ab.toml")
    plan = plan_layout(layout)
    roles = [part.spec.role for part in plan.partitions]
    assert roles == [Role.BOOT, Role.SYSTEM_A, Role.SYSTEM_B, Role.DATA, Role.RECOVERY]
    for part in plan.partitions:
        assert part.offset % layout.alignment == 0
        assert part.size == part.spec.size
    ends = [(p.first_lba, p.last_lba) for p in plan.partitions]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ends))
    # room for the backup GPT (33 sectors) after the last partition
    assert plan.disk_size >= (plan.partitions[-1].last_lba + 1 + 33) * 512


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('size = "24M"', 'size = "big"', '[partition.system-a] size: expected a size like "512M"'),
        ('role = "data"', 'role = "userdata"', "[partition.data] role: expected one of boot"),
        ('type = "esp"', 'type = "no-such-type"', "[partition.boot] type:"),
        ('filesystem = "ext4"', 'filesystem = "ntfs"', "[partition.system-a] filesystem"),
        ("sector-size = 512", "sector-size = 1000", "[disk] sector-size: expected 512 or 4096"),
        ('table = "gpt"', 'table = "apm"', '[disk] table: expected "gpt" or "mbr"'),
        ('alignment = "1M"', 'alignment = "1M"\ncolour = "red"', "[disk] colour: unknown key"),
        ('role = "system-b"', 'role = "system-a"', "role 'system-a' is used 2 times"),
    ],
)
def test_layout_errors_name_file_and_key(
    product: Product, old: str, new: str, expected: str
) -> None:
    _edit(product.layout, old, new)
    with pytest.raises(RecipeError) as error:
        load_recipe(product.recipe)
    assert str(product.layout) in str(error.value)
    assert expected in str(error.value)


def test_slot_pair_sizes_must_match(product: Product) -> None:
    text = product.layout.read_text()
    start = text.index("[partition.system-b]")
    product.layout.write_text(text[:start] + text[start:].replace('"24M"', '"20M"', 1))
    with pytest.raises(RecipeError, match="the two slots of a pair must have the same size"):
        load_recipe(product.recipe)


def test_layout_needs_boot_and_both_slots(product: Product) -> None:
    text = product.layout.read_text()
    start = text.index("[partition.system-b]")
    end = text.index("[partition.data]")
    product.layout.write_text(text[:start] + text[end:])
    with pytest.raises(RecipeError, match="no partition has role 'system-b'"):
        load_recipe(product.recipe)


def test_disk_size_too_small(product: Product) -> None:
    _edit(product.layout, 'alignment = "1M"', 'alignment = "1M"\nsize = "50M"')
    layout = load_layout(product.layout)
    with pytest.raises(RecipeError, match=r"\[disk\] size: the partitions need at least"):
        plan_layout(layout)


def test_grow_takes_the_rest_of_the_disk(product: Product) -> None:
    _edit(product.layout, 'alignment = "1M"', 'alignment = "1M"\nsize = "200M"')
    _edit(product.layout, 'size = "8M"\n', 'size = "8M"\ngrow = true\n')
    plan = plan_layout(load_layout(product.layout))
    data = plan.by_role(Role.DATA)
    assert data is not None
    recovery = plan.by_role(Role.RECOVERY)
    assert recovery is not None
    assert data.size > 8 << 20
    assert data.last_lba < recovery.first_lba
    assert (recovery.last_lba + 1 + 33) * 512 <= plan.disk_size


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('version = "1.0.0"', 'version = "1.0 beta"', "[product] version: expected a version"),
        ('architecture = "x86_64"', 'architecture = "m68k"', "[product] architecture"),
        ('file = "vmlinuz"', 'file = "missing-kernel"', "[kernel] file: expected an existing"),
        ('tree = "rootfs"', 'tree = "nowhere"', "[rootfs] tree: expected an existing directory"),
        ('mode = "0755"', 'mode = "rwx"', "[rootfs.file#1] mode: expected an octal file mode"),
        ('dest = "/bin/busybox"', 'dest = "/../etc/x"', "[rootfs.file#1] dest"),
        ('[signing]\nkey = "', '[signing]\nkye = "', "[signing] kye: unknown key"),
        ('[signing]\nkey = "', '[signing]\nkeys = ["nope.pem"]\nx = "', "[signing] keys[0]"),
        ('[signing]\nkey = "', '[signing]\npkcs11 = ["token=a"]\nx = "', "[signing] pkcs11[0]"),
        ('name = "tools"', 'name = "Tools!"', "[extension#1] name: expected an extension name"),
    ],
)
def test_recipe_errors_name_file_and_key(
    product: Product, old: str, new: str, expected: str
) -> None:
    _edit(product.recipe, old, new)
    with pytest.raises(RecipeError) as error:
        load_recipe(product.recipe)
    assert str(product.recipe) in str(error.value)
    assert expected in str(error.value)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "absent.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[product\nname = 1\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad)


def _minimal_elf(machine: int, elfclass: int = 2) -> bytes:
    """An ELF header with no sections: enough for pyelftools to read e_machine."""
    ident = b"\x7fELF" + bytes([elfclass, 1, 1]) + bytes(9)
    if elfclass == 2:
        return ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, 0, 0, 0, 64, 0, 0, 64, 0, 0)
    return ident + struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, 0, 0, 0, 0, 52, 0, 0, 40, 0, 0)


def test_foreign_binary_refused(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "native").write_bytes(Path("/bin/busybox").read_bytes())
    (tree / "arm64-tool").write_bytes(_minimal_elf(183))  # EM_AARCH64
    (tree / "not-elf").write_bytes(b"#!/bin/sh\n")
    mismatches = find_foreign_binaries([tree], Architecture.X86_64)
    assert [m.path.name for m in mismatches] == ["arm64-tool"]
    with pytest.raises(BuildError, match=r"arm64-tool: EM_AARCH64 \(64-bit\)"):
        check_binaries([tree], Architecture.X86_64)
    assert [m.path.name for m in find_foreign_binaries([tree], Architecture.AARCH64)] == ["native"]


def test_build_refuses_foreign_rootfs(tmp_path: Path) -> None:
    from avobuild.image.rootfs import build_rootfs_image

    product = write_product(tmp_path / "p")
    _edit(product.recipe, 'architecture = "x86_64"', 'architecture = "aarch64"')
    recipe = load_recipe(product.recipe)
    with pytest.raises(BuildError):  # the tree's busybox is refused first: x86-64
        build_rootfs_image(recipe, tmp_path / "work")


def test_kernel_formats(tmp_path: Path) -> None:
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(bytes(0x202) + b"HdrS" + bytes(100))
    check_kernel(bzimage, Architecture.X86_64)
    with pytest.raises(BuildError, match="not a kernel for aarch64"):
        check_kernel(bzimage, Architecture.AARCH64)
    arm64 = tmp_path / "Image"
    arm64.write_bytes(bytes(0x38) + b"ARM\x64" + bytes(100))
    check_kernel(arm64, Architecture.AARCH64)
    with pytest.raises(BuildError, match="bzImage"):
        check_kernel(arm64, Architecture.X86_64)
