"""Host installs are as safe as the device (issue 12, point 4). Oracles: the bytes of every
partition and the boot state before and after, read back from the disk image.

* From a file, every chunk and every delta operation is checked before the first write: a
  signed delta whose second operation is malformed leaves the disk byte-identical.
* From a stream, the target slot is marked incomplete before its first byte is written, and
  `status` says so until the install finished.
* The only confirmed slot is never the target; a downgrade needs --allow-downgrade.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import zstandard
from conftest import avobuild_cli, file_sha256, write_product

from avobuild.bundle.keys import load_private_key
from avobuild.bundle.manifest import EMPTY_SHA256, ImageRef
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.writer import ImageSource, write_bundle
from avobuild.disk.gpt import read_gpt
from avobuild.errors import BundleError, CompatibilityError, InstallError
from avobuild.image.factory import build_factory_image
from avobuild.model.layout import Slot
from avobuild.model.recipe import load_recipe
from avobuild.update.install import install_bundle, read_boot_state, write_boot_state


@dataclass(frozen=True)
class Releases:
    disk: Path  # factory image of 1.0.0
    v1: Path
    v2: Path
    delta: Path  # 1.0.0 -> 2.0.0
    source: ImageRef  # the rootfs of 1.0.0, in slot A of the factory image
    key: Path
    keyring: Path


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    root = tmp_path_factory.mktemp("safety")
    v1 = write_product(root / "product", version="1.0.0")
    image = build_factory_image(load_recipe(v1.recipe), root / "out", root / "work")
    avobuild_cli("bundle", "create", v1.recipe, "-o", root / "v1.avb")
    (v1.rootfs / "etc" / "motd").write_text("version 2\n")
    v2 = write_product(root / "product", version="2.0.0")
    avobuild_cli("bundle", "create", v2.recipe, "-o", root / "v2.avb")
    avobuild_cli("delta", "create", "--from", root / "v1.avb", "--to", root / "v2.avb",
                 "-o", root / "delta.avb", "--key", v2.private_key)  # fmt: skip
    with BundleReader.open(root / "delta.avb") as reader:
        image_entry = reader.unverified_manifest().image("rootfs")
    assert image_entry is not None and image_entry.source is not None
    return Releases(image.path, root / "v1.avb", root / "v2.avb", root / "delta.avb",
                    image_entry.source, v2.private_key, v2.public_key)  # fmt: skip


def fresh(releases: Releases, tmp_path: Path) -> Path:
    disk = tmp_path / "disk.img"
    shutil.copyfile(releases.disk, disk)
    return disk


def partitions(disk: Path) -> dict[str, str]:
    """The sha256 of every partition, by label."""
    with disk.open("rb") as handle:
        table = read_gpt(handle)
        hashes = {}
        for part in table.partitions:
            handle.seek(table.offset(part))
            hashes[part.name] = hashlib.sha256(handle.read(table.size(part))).hexdigest()
    return hashes


def hostile_delta(releases: Releases, tmp_path: Path, second: str) -> Path:
    """A signed delta from the 1.0.0 rootfs whose first operation is valid and whose second
    operation line is `second` (malformed, out of bounds or overlapping)."""
    first = b"\xab" * 101  # bytes no slot holds, so a write of them shows
    target = first + bytes(4096)
    target_ref = ImageRef(len(target), hashlib.sha256(target).hexdigest())
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(first)
    source = releases.source
    stream = (
        (
            f"avobuild-delta 1\nsource {source.size} {source.sha256}\n"
            f"target {target_ref.size} {target_ref.sha256}\n"
            f"data 0 101 {len(frame)} {hashlib.sha256(first).hexdigest()}\n"
        ).encode()
        + frame
        + f"{second}\nend 2\n".encode()
    )
    path = tmp_path / "hostile.stream"
    path.write_bytes(stream)
    bundle = tmp_path / "hostile.avb"
    write_bundle(bundle, [ImageSource("rootfs", path, source=source, target=target_ref)],
                 name="testprod", version="2.0.0", compatible="testprod-x86_64",
                 build_date=0, private_key=load_private_key(releases.key),
                 chunk_size=64 << 10)  # fmt: skip
    return bundle


SECOND_OPERATIONS = {
    "octal-looking length": "zero 101 010000",
    "negative source offset": f"copy 101 4096 -67108864 {'0' * 64}",
    "overlapping extent": "zero 50 4147",
    "extent past the target": "zero 101 4097",
    "extra field": "zero 101 4096 7",
    "copy past the source": f"copy 101 4096 999999999999 {'0' * 64}",
    "number over 2^63 - 1": "zero 101 9223372036854775808",
}


@pytest.mark.parametrize("case", sorted(SECOND_OPERATIONS))
def test_a_malformed_second_delta_operation_writes_nothing_from_a_file(
    releases: Releases, tmp_path: Path, case: str
) -> None:
    bundle = hostile_delta(releases, tmp_path, SECOND_OPERATIONS[case])
    disk = fresh(releases, tmp_path)
    before = file_sha256(disk)
    with pytest.raises(BundleError) as refused:
        install_bundle(bundle, disk, releases.keyring)
    assert "byte offset" in str(refused.value)
    assert file_sha256(disk) == before, "a refused delta from a file changed the disk"


def test_a_malformed_delta_from_a_stream_leaves_the_slot_marked_incomplete(
    releases: Releases, tmp_path: Path
) -> None:
    bundle = hostile_delta(releases, tmp_path, SECOND_OPERATIONS["overlapping extent"])
    disk = fresh(releases, tmp_path)
    before, state = partitions(disk), read_boot_state(disk)
    with pytest.raises(BundleError, match="does not follow"):
        install_bundle(Path("<stdin>"), disk, releases.keyring,
                       stream=io.BytesIO(bundle.read_bytes()))  # fmt: skip
    after = partitions(disk)
    assert {label for label in before if before[label] != after[label]} <= {"system-b", "boot"}
    assert read_boot_state(disk) == state.with_incomplete(Slot.B)
    status = json.loads(avobuild_cli("status", "--disk", disk, "--json").stdout)
    assert status["primary"] == "A" and status["slots"]["A"]["ok"] is True
    assert status["slots"]["B"] == {
        "ok": False, "tries": 0, "version": "", "security_version": 0, "incomplete": True
    }  # fmt: skip


@pytest.mark.parametrize("source", ["file", "stream"])
@pytest.mark.parametrize("kind", ["full", "delta"])
def test_the_target_is_marked_incomplete_before_it_is_written(
    releases: Releases, tmp_path: Path, source: str, kind: str
) -> None:
    """The boot state seen while the slot is being written says incomplete; afterwards the
    slot is the pending trial slot, and nothing but slot B and the boot partition changed."""
    bundle = releases.v2 if kind == "full" else releases.delta
    disk = fresh(releases, tmp_path)
    before = partitions(disk)
    seen: list[tuple[str, bool]] = []

    def progress(step: str, done: int, _total: int) -> None:
        if step.startswith(("writing", "applying")) and done and not seen:
            seen.append((step, read_boot_state(disk).slots[Slot.B].incomplete))
            seen.append(("status", "slot B: (incomplete" in avobuild_cli(
                "status", "--disk", disk).stdout))  # fmt: skip

    stream = io.BytesIO(bundle.read_bytes()) if source == "stream" else None
    install_bundle(Path("<stdin>") if stream else bundle, disk, releases.keyring,
                   stream=stream, progress=progress)  # type: ignore[arg-type]  # fmt: skip
    assert [marked for _step, marked in seen] == [True, True], seen
    state = read_boot_state(disk)
    assert state.primary is Slot.B and not state.slots[Slot.B].incomplete
    assert state.slots[Slot.B].version == "2.0.0" and state.slots[Slot.B].tries == 3
    after = partitions(disk)
    assert {label for label in before if before[label] != after[label]} == {"system-b", "boot"}


def test_the_only_confirmed_slot_is_never_the_target(releases: Releases, tmp_path: Path) -> None:
    """Two installs in a row: the second would overwrite slot A, the only confirmed one, while
    B still waits for its trial boot. Refused with the disk unchanged, from the library and
    the command line; once B is confirmed the same install goes to A."""
    disk = fresh(releases, tmp_path)
    install_bundle(releases.v2, disk, releases.keyring)
    before = file_sha256(disk)
    for bundle in (releases.v2, releases.delta):
        with pytest.raises(InstallError, match=r"slot A .* is the only confirmed slot"):
            install_bundle(bundle, disk, releases.keyring)
        assert file_sha256(disk) == before
    refused = avobuild_cli("install", releases.v2, "--disk", disk, "--keyring",
                           releases.keyring, check=False)  # fmt: skip
    assert refused.returncode == InstallError.exit_code
    assert "Boot and confirm slot B first" in refused.stderr
    with pytest.raises(InstallError, match="only confirmed slot"):
        install_bundle(Path("<stdin>"), disk, releases.keyring,
                       stream=io.BytesIO(releases.v2.read_bytes()))  # fmt: skip
    assert file_sha256(disk) == before, "a refused stream wrote before the slot check"
    # The device confirms B (as its applier would): now A is the target, B is kept.
    write_boot_state(disk, read_boot_state(disk).with_confirmed(Slot.B))
    result = install_bundle(releases.v2, disk, releases.keyring)
    assert result.slot is Slot.A and read_boot_state(disk).slots[Slot.B].ok


def test_a_stream_cut_half_way_never_leaves_a_slot_that_looks_confirmed(
    releases: Releases, tmp_path: Path
) -> None:
    """Both slots confirmed, slot A inactive: a stream cut in the middle overwrote part of A;
    `status` no longer calls A '1.0.0 (confirmed)', B still boots."""
    disk = fresh(releases, tmp_path)
    install_bundle(releases.v2, disk, releases.keyring, confirm=True)
    state = read_boot_state(disk)
    assert state.primary is Slot.B and state.slots[Slot.A].ok and state.slots[Slot.B].ok
    before = partitions(disk)
    data = releases.v1.read_bytes()
    with pytest.raises(BundleError, match="truncated"):
        install_bundle(Path("<stdin>"), disk, releases.keyring, allow_downgrade=True,
                       stream=io.BytesIO(data[: len(data) * 2 // 3]))  # fmt: skip
    after = partitions(disk)
    assert before["system-b"] == after["system-b"] and before["data"] == after["data"]
    assert read_boot_state(disk) == state.with_incomplete(Slot.A)
    text = avobuild_cli("status", "--disk", disk).stdout
    assert "slot A: (incomplete" in text and "1.0.0 (confirmed)" not in text
    assert "* slot B: 2.0.0 (confirmed)" in text


def test_a_downgrade_needs_to_be_asked_for(releases: Releases, tmp_path: Path) -> None:
    disk = fresh(releases, tmp_path)
    install_bundle(releases.v2, disk, releases.keyring, confirm=True)
    before = file_sha256(disk)
    with pytest.raises(CompatibilityError, match=r"bundle 1\.0\.0 is older than 2\.0\.0"):
        install_bundle(releases.v1, disk, releases.keyring)
    assert file_sha256(disk) == before
    refused = avobuild_cli("install", releases.v1, "--disk", disk, "--keyring",
                           releases.keyring, check=False)  # fmt: skip
    assert refused.returncode == CompatibilityError.exit_code
    assert "--allow-downgrade" in refused.stderr and file_sha256(disk) == before
    avobuild_cli("install", releases.v1, "--disk", disk, "--keyring", releases.keyring,
                 "--allow-downgrade")  # fmt: skip
    state = read_boot_state(disk)
    assert state.primary is Slot.A and state.slots[Slot.A].version == "1.0.0"
    # The same version again is no downgrade (a reinstall), judged against the running slot.
    write_boot_state(disk, replace(state, primary=Slot.B))
    install_bundle(releases.v2, disk, releases.keyring)


def test_an_added_image_is_a_delta_from_the_empty_image(tmp_path: Path) -> None:
    """docs/delta-format.md, "Images": a delta adds an image the old bundle lacked with the
    empty image as its source, and leaves out an image the new bundle lacks."""
    from avobuild.delta.bundles import create_delta_bundle

    root = tmp_path
    key = root / "key.pem"
    shutil.copyfile(Path(__file__).resolve().parent.parent / "keys-example" /
                    "insecure-example.key.pem", key)  # fmt: skip
    images = {}
    for name, data in (("rootfs", b"r" * 70_000), ("kernel", b"k" * 9000), ("extensions", b"e")):
        images[name] = root / f"{name}.img"
        images[name].write_bytes(data)
    old, new = root / "old.avb", root / "new.avb"
    for path, names in ((old, ("rootfs", "extensions")), (new, ("rootfs", "kernel"))):
        write_bundle(path, [ImageSource(name, images[name]) for name in names], name="p",
                     version="1", compatible="c", build_date=0,
                     private_key=load_private_key(key), chunk_size=64 << 10)  # fmt: skip
    from avobuild.bundle.keys import load_keyring, public_key_pem
    from avobuild.bundle.sign import KeySigner
    from avobuild.bundle.signing import SigningMaterial

    signer = KeySigner(load_private_key(key))
    (root / "key.pub.pem").write_bytes(public_key_pem(signer.public_key))
    result = create_delta_bundle(
        old, new, root / "d.avb", root, keyring=load_keyring(root / "key.pub.pem"),
        signing=SigningMaterial((signer,), (), False, None, ()),
    )  # fmt: skip
    assert result.manifest is not None
    assert [image.name for image in result.manifest.images] == ["rootfs", "kernel"]
    kernel = result.manifest.image("kernel")
    assert kernel is not None and kernel.source == ImageRef(0, EMPTY_SHA256)
    assert result.manifest.manifest_version == 1
