"""Every command with bad inputs: no traceback, the README's exit code, the path named.

Missing inputs, outputs that are files, read-only disks (a read-only bind mount) and a full
disk (a filled tmpfs). The mounts need root (CI runs as root); without it those cases skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Product, avobuild_cli, write_product

from avobuild.errors import (
    BuildError,
    BundleError,
    InstallError,
    KeyError_,
    RecipeError,
)
from avobuild.fleet.errors import FleetStoreError, RepositoryError


@dataclass(frozen=True)
class Setting:
    product: Product
    image: Path  # a factory image built from the product
    bundle: Path  # a full bundle of the product
    file: Path  # a regular file, where a directory is expected
    missing: Path  # a path that does not exist
    read_only: Path | None  # a read-only directory holding a copy of `image` and `bundle`
    full: Path | None  # a directory on a full file system


def _mount(*argv: str | Path) -> None:
    subprocess.run(["mount", *map(str, argv)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setting]:
    root = tmp_path_factory.mktemp("errors")
    product = write_product(root / "product")
    built = root / "built"
    avobuild_cli("image", product.recipe, "-o", built)
    bundle = built / "b.avb"
    avobuild_cli("bundle", "create", product.recipe, "-o", bundle)
    image = built / "testprod-1.0.0.img"
    file = root / "a-file"
    file.write_text("not a directory\n")
    mounted: list[Path] = []
    read_only = full = None
    try:
        if os.geteuid() == 0 and shutil.which("mount"):
            read_only, full = root / "read-only", root / "full"
            read_only.mkdir()
            full.mkdir()
            _mount("--bind", built, read_only)
            mounted.append(read_only)
            _mount("-o", "remount,bind,ro", read_only)
            _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", full)
            mounted.append(full)
            _fill(full / "filler")
        yield Setting(product, image, bundle, file, root / "missing", read_only, full)
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", str(path)], check=True)


def _fill(path: Path) -> None:
    """Write `path` until its file system is full."""
    filler = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(filler, b"\0" * 4096):
            pass
    except OSError:
        pass  # full
    finally:
        os.close(filler)


def _cases(s: Setting) -> list[tuple[str, list[str | Path], int, Path]]:
    """(name, argv, exit code, path the message must name)."""
    p = s.product
    key, pub = p.private_key, p.public_key
    missing = s.missing / "x"
    cases: list[tuple[str, list[str | Path], int, Path]] = [
        ("image-missing-recipe", ["image", missing, "-o", s.missing], 11, missing),
        ("image-output-is-file", ["image", p.recipe, "-o", s.file], 5, s.file),
        ("bundle-create-missing", ["bundle", "create", missing, "-o", s.missing], 11, missing),
        (
            "bundle-create-output-dir-is-file",
            ["bundle", "create", p.recipe, "-o", s.file / "x.avb"],
            6,
            s.file / "x.avb",
        ),
        (
            "bundle-create-images-missing",
            [
                "bundle",
                "create",
                "--image",
                f"rootfs={missing}",
                "--name",
                "n",
                "--version",
                "1",
                "--compatible",
                "c",
                "--key",
                key,
                "-o",
                s.missing / "o.avb",
            ],
            11,
            missing,
        ),
        ("bundle-verify-missing", ["bundle", "verify", missing, "--keyring", pub], 6, missing),
        ("bundle-verify-keyring", ["bundle", "verify", s.bundle, "--keyring", missing], 9, missing),
        ("bundle-info-missing", ["bundle", "info", missing], 6, missing),
        ("bundle-digest-missing", ["bundle", "digest", missing, "-o", s.missing], 6, missing),
        (
            "bundle-digest-output",
            ["bundle", "digest", s.bundle, "-o", s.file / "d"],
            6,
            s.file / "d",
        ),
        (
            "bundle-attach-signature-missing",
            [
                "bundle",
                "attach-signature",
                s.bundle,
                "--signature",
                missing,
                "--key",
                pub,
                "-o",
                s.missing / "o.avb",
            ],
            11,
            missing,
        ),
        (
            "bundle-resign-missing",
            ["bundle", "resign", missing, "--key", key, "-o", s.missing / "o.avb"],
            6,
            missing,
        ),
        ("keys-generate-file", ["keys", "generate", "-o", s.file], 9, s.file),
        ("keys-id-missing", ["keys", "id", missing], 9, missing),
        (
            "install-missing-disk",
            ["install", s.bundle, "--disk", missing, "--keyring", pub],
            10,
            missing,
        ),
        (
            "install-missing-bundle",
            ["install", missing, "--disk", s.image, "--keyring", pub],
            6,
            missing,
        ),
        ("status-missing-disk", ["status", "--disk", missing], 10, missing),
        ("status-not-a-disk", ["status", "--disk", s.file], 10, s.file),
        ("recovery-build-missing", ["recovery", "build", missing, "-o", s.missing], 11, missing),
        (
            "recovery-install-missing",
            ["recovery", "install", missing, "--disk", s.image],
            10,
            missing,
        ),
        ("media-usb-missing", ["media", "usb", missing, "-o", s.missing / "u.iso"], 11, missing),
        (
            "media-pxe-output-is-file",
            ["media", "pxe", p.recipe, "--server", "10.0.0.1", "-o", s.file],
            5,
            s.file,
        ),
        (
            "delta-create-missing",
            [
                "delta",
                "create",
                "--from",
                missing,
                "--to",
                s.bundle,
                "--key",
                key,
                "-o",
                s.missing / "d.avb",
            ],
            6,
            missing,
        ),
        (
            "delta-apply-missing",
            [
                "delta",
                "apply",
                missing,
                "--source",
                f"rootfs={s.image}",
                "--output",
                f"rootfs={s.missing}",
                "--keyring",
                pub,
            ],
            6,
            missing,
        ),
        (
            "delta-stats-missing",
            ["delta", "stats", "--from", missing, "--to", s.bundle],
            6,
            missing,
        ),
        ("applier-render-file", ["applier", "render", p.recipe, "-o", s.file], 5, s.file),
        ("recipe-show-missing", ["recipe", "show", missing], 11, missing),
        ("layout-check-missing", ["layout", "check", missing], 11, missing),
        (
            "recipe-init-into-file",
            ["recipe", "init", s.file, "--kernel", p.kernel],
            11,
            s.file,
        ),
        (
            "repo-init-file",
            ["repo", "init", s.file, "--name", "r", "--bundle-keyring", pub, "--key", key],
            12,
            s.file,
        ),
        ("repo-add-missing", ["repo", "add", s.missing, s.bundle], 12, s.missing),
        ("repo-status-missing", ["repo", "status", s.missing], 12, s.missing),
        ("repo-refresh-missing", ["repo", "refresh", s.missing], 12, s.missing),
        (
            "repo-promote-missing",
            ["repo", "promote", s.missing, "1", "--channel", "c"],
            12,
            s.missing,
        ),
        ("repo-deltas-missing", ["repo", "deltas", s.missing], 12, s.missing),
        (
            "serve-missing",
            ["serve", s.missing, "--certificate", missing, "--key", key, "--client-ca", missing],
            12,
            s.missing,
        ),
        (
            "fleet-report-missing",
            [
                "fleet",
                "report",
                "--from",
                "2026-01-01",
                "--to",
                "2026-01-02",
                "--repository",
                s.missing,
            ],
            12,
            s.missing,
        ),
        (
            "fleet-report-database",
            [
                "fleet",
                "report",
                "--from",
                "2026-01-01",
                "--to",
                "2026-01-02",
                "--database",
                missing,
            ],
            13,
            missing,
        ),
        (
            "fleet-resume-missing",
            ["fleet", "resume", "1", "--channel", "c", "--repository", s.missing],
            12,
            s.missing,
        ),
    ]
    if s.read_only is not None:
        ro_disk = s.read_only / s.image.name
        cases += [
            (
                "install-read-only-disk",
                ["install", s.bundle, "--disk", ro_disk, "--keyring", pub],
                10,
                ro_disk,
            ),
            ("image-read-only", ["image", p.recipe, "-o", s.read_only / "o"], 5, s.read_only),
            (
                "keys-generate-read-only",
                ["keys", "generate", "-o", s.read_only / "k"],
                9,
                s.read_only / "k",
            ),
            (
                "repo-init-read-only",
                [
                    "repo",
                    "init",
                    s.read_only / "r",
                    "--name",
                    "r",
                    "--bundle-keyring",
                    pub,
                    "--key",
                    key,
                ],
                12,
                s.read_only / "r",
            ),
        ]
    if s.full is not None:
        cases += [
            ("image-full-disk", ["image", p.recipe, "-o", s.full], 5, s.full),
            (
                "bundle-create-full-disk",
                ["bundle", "create", p.recipe, "-o", s.full / "b.avb"],
                6,
                s.full / "b.avb",
            ),
            (
                "bundle-resign-full-disk",
                ["bundle", "resign", s.bundle, "--key", key, "-o", s.full / "r.avb"],
                6,
                s.full / "r.avb",
            ),
            ("keys-generate-full-disk", ["keys", "generate", "-o", s.full / "k"], 9, s.full / "k"),
            (
                "applier-render-full-disk",
                ["applier", "render", p.recipe, "-o", s.full / "a"],
                5,
                s.full / "a",
            ),
            (
                "recovery-build-full-disk",
                ["recovery", "build", p.recipe, "-o", s.full / "r.img"],
                5,
                s.full / "r.img",
            ),
            (
                "bundle-digest-full-disk",
                ["bundle", "digest", s.bundle, "-o", s.full / "digest"],
                6,
                s.full / "digest",
            ),
        ]
    return cases


def test_every_command_fails_cleanly_on_bad_inputs(setting: Setting) -> None:
    """One run per command and failure: each must end with its family's code and name the
    path; a full disk must leave no partial factory image behind."""
    families = {
        5: BuildError,
        6: BundleError,
        9: KeyError_,
        10: InstallError,
        11: RecipeError,
        12: RepositoryError,
        13: FleetStoreError,
    }
    failures = []
    for name, argv, code, path in _cases(setting):
        assert families[code].exit_code == code
        result = avobuild_cli(*argv, check=False)
        problems = []
        if "Traceback" in result.stderr:
            problems.append("traceback")
        if result.returncode != code:
            problems.append(f"exit code {result.returncode}, expected {code}")
        if str(path) not in result.stderr:
            problems.append(f"message does not name {path}")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n{result.stderr[-400:]}")
    assert not failures, "\n".join(failures)
    if setting.full is not None:
        assert not list(setting.full.glob("*.img.tmp")), "a partial image stayed behind"
        assert not list(setting.full.glob("testprod-*"))
        files = sorted(path.name for path in setting.full.iterdir() if path.is_file())
        assert files == ["filler"], f"partial outputs stayed behind: {files}"
    assert not setting.missing.exists(), "a command created a missing input path"


def test_os_errors_map_to_the_commands_family() -> None:
    from avobuild.cli.common import os_error_family, output_paths

    assert os_error_family(["--debug", "install", "x"]) is InstallError
    assert os_error_family(["recovery", "install", "x"]) is InstallError
    assert os_error_family(["recovery", "build", "x"]) is BuildError
    assert os_error_family(["repo", "add", "x"]) is RepositoryError
    assert os_error_family(["doctor"]).exit_code == 1
    assert output_paths(["image", "r", "-o", "out", "--disk=d.img"]) == ["out", "d.img"]
