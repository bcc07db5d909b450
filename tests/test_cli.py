"""The command line as users and pipelines call it: outputs, exit codes, reproducibility."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, Product, avobuild_cli

from avobuild.errors import AvobuildError, RecipeError, ToolMissing
from avobuild.run import TOOLS, which


def test_version_and_help() -> None:
    assert avobuild_cli("--version").stdout.startswith("avobuild ")
    help_text = avobuild_cli("--help").stdout
    for command in ("image", "bundle", "install", "keys", "status", "doctor"):
        assert command in help_text


def test_keys_generate_makes_an_openssl_readable_pair(tmp_path: Path) -> None:
    result = avobuild_cli("keys", "generate", "-o", tmp_path / "keys")
    private, public = (Path(line) for line in result.stdout.split())
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    text = subprocess.run(
        ["openssl", "pkey", "-in", str(private), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "ED25519 Private-Key" in text
    derived = subprocess.run(
        ["openssl", "pkey", "-in", str(private), "-pubout"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert derived == public.read_text()
    again = avobuild_cli("keys", "generate", "-o", tmp_path / "keys", check=False)
    assert again.returncode != 0, "generate must not overwrite an existing key"


def test_bundle_from_images_and_info_json(product: Product, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(bytes(range(256)) * 9000)
    kernel = product.kernel
    bundle = tmp_path / "out.avb"
    avobuild_cli(
        "bundle", "create", "--image", f"rootfs={rootfs}", "--image", f"kernel={kernel}",
        "--name", "pipeline", "--version", "7.1", "--compatible", "board-x",
        "--key", product.private_key, "--chunk-size", "64K", "-o", bundle,
    )  # fmt: skip
    info = json.loads(
        avobuild_cli("bundle", "info", bundle, "--json", "--keyring", product.public_key).stdout
    )
    assert (info["name"], info["version"], info["compatible"]) == ("pipeline", "7.1", "board-x")
    assert info["signature_verified"] is True
    assert info["chunk_size"] == 65536
    images = {image["name"]: image for image in info["images"]}
    for name, path in (("rootfs", rootfs), ("kernel", kernel)):
        data = path.read_bytes()
        assert images[name]["size"] == len(data)
        assert images[name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert images[name]["chunks"] == -(-len(data) // 65536)
    assert info["total_size"] == bundle.stat().st_size
    unverified = json.loads(avobuild_cli("bundle", "info", bundle, "--json").stdout)
    assert unverified["signature_verified"] is False
    ok = avobuild_cli("bundle", "verify", bundle, "--keyring", product.public_key)
    assert ok.stdout.startswith(f"{bundle}: OK")


def test_bundle_verify_exit_codes(product: Product, tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"x" * 100_000)
    bundle = tmp_path / "b.avb"
    avobuild_cli(
        "bundle", "create", "--image", f"rootfs={image}", "--name", "p", "--version", "1",
        "--compatible", "c", "--key", product.private_key, "-o", bundle,
    )  # fmt: skip
    data = bytearray(bundle.read_bytes())
    data[-5] ^= 0xFF
    bad = tmp_path / "bad.avb"
    bad.write_bytes(bytes(data))
    result = avobuild_cli("bundle", "verify", bad, "--keyring", product.public_key, check=False)
    assert result.returncode == 6
    assert "Traceback" not in result.stderr
    assert "chunk" in result.stderr
    other = tmp_path / "other"
    avobuild_cli("keys", "generate", "-o", other)
    result = avobuild_cli(
        "bundle", "verify", bundle, "--keyring", other / "bundle-signing.pub.pem", check=False
    )
    assert result.returncode == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "rootfs"], "expected NAME=PATH"),
        (["--image", "rootfs=/nonexistent"], "no such file"),
        (["--image", "rootfs=/etc/hostname", "--name", "bad name"], "--name"),
    ],
)
def test_bundle_create_argument_errors(
    product: Product, tmp_path: Path, args: list[str], message: str
) -> None:
    result = avobuild_cli(
        "bundle", "create", *args, "--version", "1", "--compatible", "c",
        "--key", product.private_key, "-o", tmp_path / "x.avb", check=False,
    )  # fmt: skip
    assert result.returncode == RecipeError.exit_code
    assert message in result.stderr
    assert not (tmp_path / "x.avb").exists()


def test_bundle_from_recipe_is_reproducible(product: Product, tmp_path: Path) -> None:
    assert os.environ["SOURCE_DATE_EPOCH"].isdigit()  # conftest.py (or make) sets it
    first, second = tmp_path / "1.avb", tmp_path / "2.avb"
    avobuild_cli("bundle", "create", product.recipe, "-o", first)
    for path in product.rootfs.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (1_500_000_000, 1_500_000_000))
    avobuild_cli("bundle", "create", product.recipe, "-o", second)
    assert first.read_bytes() == second.read_bytes()


def test_missing_tool_names_the_package() -> None:
    with pytest.raises(ToolMissing) as error:
        which("mkfs.definitely-not-here")
    assert "mkfs.definitely-not-here: not found" in str(error.value)
    assert "apt-get install" in str(error.value)


def test_doctor_lists_tools() -> None:
    result = avobuild_cli("doctor")
    assert "ok      mke2fs" in result.stdout
    assert "MISSING" not in result.stdout


def _doctor_without(tool: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`avobuild doctor` with a PATH holding every installed tool but `tool`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in TOOLS:
        found = shutil.which(name)
        if name != tool and found is not None:
            (bin_dir / name).symlink_to(found)
    exe = REPO / ".venv" / "bin" / "avobuild"
    return subprocess.run(
        [str(exe), "doctor"], capture_output=True, text=True, check=False,
        env={"PATH": str(bin_dir)},
    )  # fmt: skip


def test_doctor_separates_build_tools_from_test_tools(tmp_path: Path) -> None:
    result = _doctor_without("cpio", tmp_path)
    build, test = result.stdout.split("test-only tools")
    assert "MISSING cpio" in test and "MISSING" not in build
    assert result.returncode == 0, "a missing test-only tool is no error"
    assert "ok      mke2fs" in build and "ok      qemu-system-x86_64" in test


def test_doctor_fails_on_a_missing_build_tool(tmp_path: Path) -> None:
    result = _doctor_without("mksquashfs", tmp_path)
    build, _test = result.stdout.split("test-only tools")
    assert "MISSING mksquashfs   needed to build squashfs images" in build
    assert result.returncode == ToolMissing.exit_code


def test_exit_codes_are_distinct_and_not_typers_usage_code() -> None:
    import avobuild.fleet.errors  # noqa: F401  (the fleet's families count too)

    families = _error_families(AvobuildError)
    codes = [family.exit_code for family in families if "exit_code" in vars(family)]
    assert len(codes) == len(set(codes)), codes
    assert 2 not in codes
    usage = avobuild_cli("bundle", "create", "--no-such-option", check=False)
    assert usage.returncode == 2 != RecipeError.exit_code


def _error_families(base: type[AvobuildError]) -> list[type[AvobuildError]]:
    families = [base]
    for child in base.__subclasses__():
        families.extend(_error_families(child))
    return families


def test_build_date_is_the_clock_without_source_date_epoch(
    product: Product, tmp_path: Path
) -> None:
    """Never 0: `expires` and certificate times are judged against it."""
    import time

    image = tmp_path / "img"
    image.write_bytes(b"y" * 10_000)
    env = {name: value for name, value in os.environ.items() if name != "SOURCE_DATE_EPOCH"}
    before = int(time.time())
    avobuild_cli(
        "bundle", "create", "--image", f"rootfs={image}", "--name", "p", "--version", "1",
        "--compatible", "c", "--key", product.private_key, "-o", tmp_path / "b.avb", env=env,
    )  # fmt: skip
    after = int(time.time())
    info = json.loads(avobuild_cli("bundle", "info", tmp_path / "b.avb", "--json").stdout)
    assert before <= info["build_date"] <= after
    pinned = avobuild_cli(
        "bundle", "create", "--image", f"rootfs={image}", "--name", "p", "--version", "1",
        "--compatible", "c", "--key", product.private_key, "-o", tmp_path / "c.avb",
    )  # fmt: skip
    assert pinned.returncode == 0
    info = json.loads(avobuild_cli("bundle", "info", tmp_path / "c.avb", "--json").stdout)
    assert info["build_date"] == int(os.environ["SOURCE_DATE_EPOCH"])
    bad = avobuild_cli(
        "bundle", "create", "--image", f"rootfs={image}", "--name", "p", "--version", "1",
        "--compatible", "c", "--key", product.private_key, "-o", tmp_path / "d.avb",
        check=False, env={**env, "SOURCE_DATE_EPOCH": "yesterday"},
    )  # fmt: skip
    assert bad.returncode == RecipeError.exit_code
    assert "SOURCE_DATE_EPOCH: expected seconds since 1970" in bad.stderr
    assert not (tmp_path / "d.avb").exists()
