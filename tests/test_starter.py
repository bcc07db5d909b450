"""A new user's first steps: `recipe init` writes a starter that `image` builds (checked with
sfdisk, e2fsck and mtools), `layout check` validates a layout alone, and a misspelt key is
named with what it was probably meant to be."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, Product, avobuild_cli

KERNEL = REPO / "build" / "debian" / "vmlinuz"


@pytest.mark.skipif(not KERNEL.is_file(), reason="needs scripts/fetch-kernel (make does it)")
def test_recipe_init_builds_an_image_that_checks(tmp_path: Path) -> None:
    starter = tmp_path / "starter"
    init = json.loads(
        avobuild_cli(
            "recipe", "init", starter, "--kernel", KERNEL, "--name", "first", "--json"
        ).stdout
    )
    recipe = Path(init["recipe"])
    document = tomllib.loads(recipe.read_text())  # tomli-w's TOML, read by another reader
    assert document["product"]["name"] == "first" and document["boot"]["method"] == "grub-efi"
    assert (starter / "keys" / "bundle-signing.key.pem").is_file()
    built = json.loads(avobuild_cli("image", recipe, "-o", tmp_path / "out", "--json").stdout)
    disk = Path(built["path"])
    table = json.loads(
        subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True, check=True).stdout
    )["partitiontable"]
    assert [p["name"] for p in table["partitions"]] == [
        "boot", "system-a", "system-b", "data", "recovery",
    ]  # fmt: skip
    system_a = table["partitions"][1]
    assert system_a["start"] * 512 == built["partitions"][1]["offset"]
    slot = tmp_path / "system-a.img"
    subprocess.run(
        ["dd", f"if={disk}", f"of={slot}", "bs=512", f"skip={system_a['start']}",
         f"count={system_a['size']}", "status=none"],
        check=True,
    )  # fmt: skip
    fsck = subprocess.run(["e2fsck", "-fn", str(slot)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    esp = f"{disk}@@{table['partitions'][0]['start'] * 512}"
    listing = subprocess.run(
        ["mdir", "-i", esp, "-b", "::/EFI/BOOT"], capture_output=True, text=True, check=True
    ).stdout
    assert "BOOTX64.EFI" in listing.upper()
    status = json.loads(avobuild_cli("status", "--disk", disk, "--json").stdout)
    assert status["slots"]["A"]["version"] == "0.1.0"
    again = avobuild_cli("recipe", "init", starter, "--kernel", KERNEL, check=False)
    assert again.returncode == 11 and "not an empty directory" in again.stderr


def test_layout_check(product: Product, tmp_path: Path) -> None:
    for layout in sorted((REPO / "layouts").glob("*.toml")):
        if "mbr" in layout.name and not Path("/usr/lib/u-boot/pine64_plus").exists():
            continue  # its raw regions name Debian's u-boot-sunxi files
        checked = json.loads(avobuild_cli("layout", "check", layout, "--json").stdout)
        assert checked["partitions"] and checked["disk_size"] > 0
    text = avobuild_cli("layout", "check", product.layout).stdout
    assert text.startswith(f"{product.layout}: OK, GPT")
    overlapping = tmp_path / "overlap.toml"
    overlapping.write_text(
        product.layout.read_text().replace('size = "24M"', 'size = "24M"\noffset = "1M"', 1)
    )
    refused = avobuild_cli("layout", "check", overlapping, check=False)
    assert refused.returncode == 11 and str(overlapping) in refused.stderr


def test_misspelt_keys_are_named(product: Product) -> None:
    recipe = product.recipe.read_text()
    product.recipe.write_text(recipe.replace("compatible = ", "compatibel = "))
    missing = avobuild_cli("recipe", "show", product.recipe, check=False)
    assert missing.returncode == 11
    assert "[product] compatible: missing" in missing.stderr
    assert "'compatibel': a misspelling of 'compatible'?" in missing.stderr
    product.recipe.write_text(recipe)
    layout = product.layout.read_text()
    product.layout.write_text(layout.replace('filesystem = "ext4"', 'filesytem = "ext4"', 1))
    unknown = avobuild_cli("layout", "check", product.layout, check=False)
    assert unknown.returncode == 11
    assert "filesytem: unknown key (did you mean 'filesystem'?" in unknown.stderr
    product.layout.write_text(layout.replace('role = "data"', 'role = "dta"'))
    value = avobuild_cli("layout", "check", product.layout, check=False).stderr
    assert "[partition.data] role: expected one of" in value
    assert "got 'dta' (did you mean 'data'?)" in value
    product.layout.write_text(layout.replace('role = "data"', 'rol = "data"'))
    required = avobuild_cli("layout", "check", product.layout, check=False).stderr
    assert "[partition.data] role: missing" in required and "'rol': a misspelling" in required


@pytest.mark.slow
def test_the_starter_boots_in_qemu(tmp_path: Path) -> None:
    """What `recipe init` writes boots as it is: GRUB, slot A, the applier's boot marker."""
    from test_media_boot import qemu, uefi_args

    starter = tmp_path / "starter"
    avobuild_cli("recipe", "init", starter, "--kernel", KERNEL, "--name", "first")
    built = json.loads(
        avobuild_cli("image", starter / "recipe.toml", "-o", tmp_path / "out", "--json").stdout
    )
    args = [
        *uefi_args(tmp_path),
        "-drive",
        f"file={built['path']},format=raw,if=virtio,snapshot=on",
        "-net",
        "none",
    ]
    with qemu(args, tmp_path / "console.log") as machine:
        machine.expect(b"AVOBUILD-BOOT-OK slot=A version=0.1.0\r\n", timeout=300)


@pytest.mark.skipif(not KERNEL.is_file(), reason="needs scripts/fetch-kernel (make does it)")
def test_a_slot_without_init_is_refused(tmp_path: Path) -> None:
    """An image the slot initramfs could not hand over to is never built: no /sbin/init, or
    one that is a dangling link, names the path and what to do."""
    starter = tmp_path / "starter"
    avobuild_cli("recipe", "init", starter, "--kernel", KERNEL, "--name", "first")
    init = starter / "rootfs" / "sbin" / "init"
    init.unlink()
    result = avobuild_cli("image", starter / "recipe.toml", "-o", tmp_path / "out", check=False)
    assert result.returncode == 11, result.stderr
    assert "/sbin/init (/sbin/init) is missing" in result.stderr
    assert "Traceback" not in result.stderr and not list((tmp_path / "out").glob("*.img"))
    init.symlink_to("../bin/nothing-here")
    result = avobuild_cli("image", starter / "recipe.toml", "-o", tmp_path / "out", check=False)
    assert result.returncode == 11 and "(/bin/nothing-here) is missing" in result.stderr
