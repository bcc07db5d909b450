"""The ISO writer's own rules: ECMA-119 names as mkisofs makes them, refusals before writing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from avobuild.disk.iso import IsoBoot, iso_names, write_iso
from avobuild.errors import BuildError

BOOT = IsoBoot("isolinux/isolinux.bin", "isolinux/boot.cat")


def test_iso_names_are_level_3_identifiers() -> None:
    names = iso_names(
        ["vmlinuz", "initrd.img", "factory.img.gz", "a.b", "A.B", "x" * 40, ".hidden"],
        directories=False,
    )
    assert names["vmlinuz"] == "VMLINUZ.;1"
    assert names["initrd.img"] == "INITRD.IMG;1"
    assert names["factory.img.gz"] == "FACTORY_IMG.GZ;1"
    assert {names["a.b"], names["A.B"]} == {"A.B;1", "A1.B;1"}
    assert names["x" * 40] == "X" * 29 + ".;1"
    assert names[".hidden"] == "_.HIDDEN;1"
    for name in names.values():
        identifier = name.removesuffix(";1")
        assert len(identifier) <= 31 and set(identifier) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_."
        )
    assert iso_names(["efi.d", "EFI.D", "grub"], directories=True) == {
        "EFI.D": "EFI_D",
        "efi.d": "EFI_D1",
        "grub": "GRUB",
    }


def _tree(root: Path) -> Path:
    (root / "isolinux").mkdir(parents=True)
    (root / "isolinux" / "isolinux.bin").write_bytes(bytes(2048))
    (root / "docs").mkdir()
    (root / "docs" / "read.me").write_text("hello\n")
    return root


def test_names_that_collide_after_mapping_all_survive(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    for name in ("a-b.txt", "a_b.txt", "A-B.TXT"):
        (tree / "docs" / name).write_text(name)
    image = write_iso(tree, tmp_path / "x.iso", volume_id="T", boot=BOOT, epoch=0)
    for name in ("a-b.txt", "a_b.txt", "A-B.TXT"):
        extracted = tmp_path / name
        subprocess.run(
            [
                "xorriso",
                "-osirrox",
                "on",
                "-indev",
                str(image.path),
                "-extract",
                f"/docs/{name}",
                str(extracted),
            ],
            capture_output=True,
            check=True,
        )
        assert extracted.read_text() == name


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda tree: (tree / "docs" / "link").symlink_to("read.me"), "not a regular file"),
        (lambda tree: os.mkfifo(tree / "docs" / "fifo"), "not a regular file"),
        (lambda tree: (tree / "isolinux" / "isolinux.bin").unlink(), "BIOS boot image"),
        (lambda tree: (tree / "isolinux" / "boot.cat").write_text(""), "boot catalog"),
        (
            lambda tree: (tree / "a/b/c/d/e/f/g/h").mkdir(parents=True),
            "deeper than ISO 9660's 8 directory levels",
        ),
    ],
)
def test_refusals(tmp_path: Path, change: object, expected: str) -> None:
    tree = _tree(tmp_path / "tree")
    change(tree)  # type: ignore[operator]
    with pytest.raises(BuildError, match=expected):
        write_iso(tree, tmp_path / "x.iso", volume_id="T", boot=BOOT, epoch=0)
    assert not (tmp_path / "x.iso").exists()


def test_volume_id_is_checked(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    for bad in ("", "lower", "X" * 33):
        with pytest.raises(BuildError, match="volume id"):
            write_iso(tree, tmp_path / "x.iso", volume_id=bad, boot=BOOT, epoch=0)
