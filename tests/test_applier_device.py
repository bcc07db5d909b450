"""The rendered avocado-update, run under busybox sh against a simulated device.

The device is a factory disk image file whose partitions the applier addresses by byte offset
(AVO_DISK), the ESP's grubenv as a plain file (AVO_GRUBENV; on a device the ESP is mounted at
/boot/efi), a state directory standing in for the data partition's, and a fake /proc and /sys.
The test plays the bootloader with `trial_boot`, the model of the rendered grub.cfg.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Product, avobuild_cli, write_product

from avobuild.applier.render import SCRIPT_PATH, render_applier
from avobuild.boot.grubenv import parse_grubenv, render_grubenv
from avobuild.boot.state import BOOT_STATE_PATH, BootState
from avobuild.boot.trial import trial_boot
from avobuild.bundle.keys import generate_keypair
from avobuild.disk.plan import DiskPlan, plan_layout
from avobuild.errors import RecipeError
from avobuild.fs import read_vfat_file
from avobuild.image.factory import build_factory_image, build_slot_images
from avobuild.model.layout import Role, Slot
from avobuild.model.recipe import load_recipe
from avobuild.update.install import install_bundle

ROLLBACK = """
[applier]
bootloader = "grub"
init = "busybox"

[rollback.boot_failure]
max_attempts = 3
timeout = "60s"

[rollback.service_health]
critical_services = []
check_interval = "1s"
failure_threshold = 2

[[rollback.system_metrics.conditions]]
metric = "memory_usage"
threshold = "90%"
duration = "2s"

[[rollback.system_metrics.conditions]]
metric = "cpu_temperature"
threshold = "85C"
duration = "2s"
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_range(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


@dataclass(frozen=True)
class Setup:
    root: Path
    factory: Path
    bundle: Path
    keyring: Path
    rendered: Path
    plan: DiskPlan
    grubenv: bytes
    slot_image: bytes
    busybox_path: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return build_setup(tmp_path_factory.mktemp("applier"))


def build_setup(root: Path) -> Setup:
    """The factory image (1.0.0), a bundle of 2.0.0, the rendered applier with test hooks."""
    v1 = write_product(root / "product", version="1.0.0")
    with v1.recipe.open("a") as handle:
        handle.write(ROLLBACK)
    recipe = load_recipe(v1.recipe)
    image = build_factory_image(recipe, root / "out", root / "work1")
    (v1.rootfs / "etc" / "motd").write_text("version 2\n")
    v2 = write_product(root / "product", version="2.0.0")
    bundle = root / "out" / "v2.avb"
    avobuild_cli("bundle", "create", v2.recipe, "-o", bundle, "--chunk-size", "512K")
    slot_image = build_slot_images(load_recipe(v2.recipe), root / "work2")["rootfs"].read_bytes()
    rendered = root / "rendered"
    render_applier(recipe, rendered, test_hooks=True)
    plan = plan_layout(recipe.layout)
    boot = plan.by_role(Role.BOOT)
    assert boot is not None
    grubenv = read_vfat_file(image.path, boot.offset, BOOT_STATE_PATH)
    return Setup(
        root,
        image.path,
        bundle,
        v1.public_key,
        rendered,
        plan,
        grubenv,
        slot_image,
        _busybox_path(root / "bin"),
    )


def _busybox_path(directory: Path) -> str:
    """A PATH with busybox applets, openssl, zstd and bspatch, and nothing else."""
    directory.mkdir()
    busybox = shutil.which("busybox")
    assert busybox is not None
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        (directory / applet).symlink_to(busybox)
    for tool in ("openssl", "zstd", "bspatch"):
        found = shutil.which(tool)
        assert found is not None
        (directory / tool).unlink(missing_ok=True)
        (directory / tool).symlink_to(found)
    return str(directory)


class Device:
    """A simulated device: disk image, grubenv file, state dir, fake /proc and /sys."""

    def __init__(self, setup: Setup, root: Path) -> None:
        self.setup = setup
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.disk = root / "disk.img"
        shutil.copyfile(setup.factory, self.disk)
        self.grubenv = root / "grubenv"
        self.grubenv.write_bytes(setup.grubenv)
        self.state = root / "data" / "avocado-update"
        self.proc = root / "proc"
        self.sys = root / "sys"
        self.proc.mkdir()
        self.set_memory(total=1_000_000, available=800_000)
        zone = self.sys / "class" / "thermal" / "thermal_zone0"
        zone.mkdir(parents=True)
        self.set_temperature(45)
        (self.sys / "class" / "net" / "eth0").mkdir(parents=True)
        (self.sys / "class" / "net" / "eth0" / "operstate").write_text("up\n")
        self.conf = root / "etc-avocado"
        shutil.copytree(setup.rendered / "etc" / "avocado", self.conf)
        self.booted = Slot.A
        self.write_cmdline()

    def set_memory(self, *, total: int, available: int) -> None:
        (self.proc / "meminfo").write_text(
            f"MemTotal:       {total} kB\nMemFree:        {available // 2} kB\n"
            f"MemAvailable:   {available} kB\n"
        )

    def set_temperature(self, celsius: int) -> None:
        temp = self.sys / "class" / "thermal" / "thermal_zone0" / "temp"
        temp.write_text(f"{celsius * 1000}\n")

    def write_cmdline(self) -> None:
        (self.proc / "cmdline").write_text(f"root=PARTUUID=x ro avo.slot={self.booted.value}\n")

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": self.setup.busybox_path,
            "AVO_DISK": str(self.disk),
            "AVO_GRUBENV": str(self.grubenv),
            "AVO_STATE_DIR": str(self.state),
            "AVO_CONF_DIR": str(self.conf),
            "AVO_PROC": str(self.proc),
            "AVO_SYS": str(self.sys),
            "AVO_TMPDIR": str(self.root),
            "AVO_NO_REBOOT": "1",
            **extra,
        }

    def run(
        self, *args: str | Path, stdin: bytes | None = None, check: bool = True, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        script = self.setup.rendered / "usr" / "sbin" / "avocado-update"
        result = subprocess.run(
            [f"{self.setup.busybox_path}/sh", str(script), *map(str, args)],
            input=stdin.decode("latin-1") if stdin is not None else None,
            capture_output=True,
            text=True,
            encoding="latin-1",
            env=self.env(**extra),
            check=False,
            # its own process group: the power-cut hook kills the applier's whole group
            start_new_session=True,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"avocado-update {' '.join(map(str, args))} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def variables(self) -> dict[str, str]:
        return parse_grubenv(self.grubenv.read_bytes())

    def boot_state(self) -> BootState:
        return BootState.from_variables(self.variables(), str(self.grubenv))

    def reboot(self) -> Slot:
        """Play the bootloader (the grub.cfg rule), then run the applier's boot hook."""
        slot, saved = trial_boot(self.variables())
        self.grubenv.write_bytes(render_grubenv(saved))
        self.booted = slot
        self.write_cmdline()
        self.run("boot")
        return slot

    def partition(self, role: Role) -> bytes:
        part = self.setup.plan.by_role(role)
        assert part is not None
        return read_range(self.disk, part.offset, part.size)

    def history(self) -> str:
        path = self.state / "history"
        return path.read_text() if path.exists() else ""

    def state_value(self, key: str) -> str:
        for line in (self.state / "state").read_text().splitlines():
            if line.startswith(key + "="):
                return line.partition("=")[2]
        return ""


@pytest.fixture
def device(setup: Setup, tmp_path: Path) -> Device:
    return Device(setup, tmp_path / "device")


def test_install_reboot_confirm_matches_reference_installer(
    setup: Setup, device: Device, tmp_path: Path
) -> None:
    data_before = device.partition(Role.DATA)
    device.run("apply", "--target", "inactive", "--bundle", setup.bundle)
    assert device.state_value("state") == "Applying"
    assert device.boot_state().primary is Slot.A, "apply alone must not switch slots"
    device.run("commit")
    state = device.boot_state()
    assert state.primary is Slot.B and state.slots[Slot.B].tries == 3
    assert not state.slots[Slot.B].ok and state.slots[Slot.B].version == "2.0.0"

    # The reference installer on a copy of the factory image writes the same slot bytes and
    # the same boot state (byte for byte: the applier writes the grubenv in the same order).
    reference = tmp_path / "reference.img"
    shutil.copyfile(setup.factory, reference)
    result = install_bundle(setup.bundle, reference, setup.keyring)
    system_b = setup.plan.by_role(Role.SYSTEM_B)
    assert system_b is not None
    assert device.partition(Role.SYSTEM_B) == read_range(reference, system_b.offset, system_b.size)
    assert device.partition(Role.SYSTEM_B)[: len(setup.slot_image)] == setup.slot_image
    assert device.grubenv.read_bytes() == render_grubenv(result.state.to_variables())
    grub_list = subprocess.run(
        ["grub-editenv", str(device.grubenv), "list"], capture_output=True, text=True, check=True
    ).stdout
    assert "avo_primary=B" in grub_list and "avo_B_tries=3" in grub_list

    assert device.reboot() is Slot.B
    assert device.boot_state().slots[Slot.B].tries == 2, "the trial boot spent one try"
    assert device.state_value("state") == "Testing"
    output = device.run("health-check").stdout
    assert "confirmed slot B (2.0.0)" in output
    state = device.boot_state()
    assert state.primary is Slot.B and state.slots[Slot.B].ok
    assert device.state_value("state") == "Active"
    status = device.run("status").stdout
    assert "Current: 2.0.0 (Partition B)" in status
    assert "Previous: 1.0.0 (Partition A)" in status
    assert device.partition(Role.DATA) == data_before
    assert device.reboot() is Slot.B, "a confirmed slot keeps booting"
    device.run("verify-partition", "--partition", "active")

    report = json.loads(device.run("report", "--format", "json").stdout)
    assert report["booted"] == "B" and report["slots"]["B"]["ok"] is True
    events = [event["event"] for event in report["events"]]
    assert events.index("apply") < events.index("commit") < events.index("confirm")


def test_streaming_apply_from_stdin_writes_the_same_bytes(setup: Setup, device: Device) -> None:
    device.run("apply", "--target", "inactive", "-", stdin=setup.bundle.read_bytes())
    assert device.partition(Role.SYSTEM_B)[: len(setup.slot_image)] == setup.slot_image
    device.run("commit")
    assert device.boot_state().primary is Slot.B


def test_failed_health_check_rolls_back(setup: Setup, device: Device) -> None:
    device.run("apply", "--target", "inactive", "--bundle", setup.bundle)
    device.run("commit")
    assert device.reboot() is Slot.B
    device.set_memory(total=1_000_000, available=50_000)  # 95 % used, threshold 90 %
    result = device.run("health-check", check=False)
    assert result.returncode == 1
    assert "system_metrics: memory_usage at 95" in result.stderr
    state = device.boot_state()
    assert state.primary is Slot.A and not state.slots[Slot.B].ok
    assert device.state_value("state") == "RollingBack"
    assert device.reboot() is Slot.A
    assert device.state_value("state") == "Idle"
    assert "rollback\tcomplete" in device.history()


def test_temperature_held_over_threshold_rolls_back(setup: Setup, device: Device) -> None:
    device.run("apply", "--target", "inactive", "--bundle", setup.bundle)
    device.run("commit")
    device.reboot()
    device.set_temperature(90)
    result = device.run("health-check", check=False)
    assert result.returncode == 1 and "cpu_temperature at 90" in result.stderr
    assert device.boot_state().primary is Slot.A


def test_exhausted_boot_attempts_fall_back_to_previous_slot(setup: Setup, device: Device) -> None:
    device.run("apply", "--target", "inactive", "--bundle", setup.bundle)
    device.run("commit")
    # Three trial boots of B that never get healthy (no health check runs), then fallback.
    assert [device.reboot() for _ in range(3)] == [Slot.B, Slot.B, Slot.B]
    assert device.boot_state().slots[Slot.B].tries == 0
    assert device.reboot() is Slot.A
    state = device.boot_state()
    assert state.primary is Slot.A and state.slots[Slot.A].ok
    assert device.state_value("state") == "Idle"
    assert "rollback\tboot_failure from=B to=A" in device.history()
    assert device.reboot() is Slot.A


def test_manual_rollback_after_confirm(setup: Setup, device: Device) -> None:
    device.run("apply", "--target", "inactive", "--bundle", setup.bundle)
    device.run("commit")
    device.reboot()
    device.run("confirm")
    test_output = device.run("rollback", "--test", "--verbose").stdout
    assert "would make slot A (1.0.0) primary" in test_output
    assert device.boot_state().primary is Slot.B, "--test changes nothing"
    device.run("check-compatibility", "--from", "current", "--to", "previous")
    backup = device.root / "backup.tar"
    device.run("backup", "--include", device.conf, "--output", backup)
    assert backup.stat().st_size > 0
    device.run("rollback", "--preserve-data", "--backup-current")
    assert device.boot_state().primary is Slot.A
    assert device.reboot() is Slot.A
    assert "Current: 1.0.0 (Partition A)" in device.run("status").stdout


def _tampered(setup: Setup, tmp_path: Path) -> Path:
    data = bytearray(setup.bundle.read_bytes())
    payload = 34 + int(data[12:22]) + int(data[23:33])
    data[payload + random.Random(5).randrange(len(data) - payload)] ^= 0x10
    path = tmp_path / "tampered.avb"
    path.write_bytes(bytes(data))
    return path


def _manifest_tampered(setup: Setup, tmp_path: Path) -> Path:
    data = setup.bundle.read_bytes()
    path = tmp_path / "manifest.avb"
    path.write_bytes(data.replace(b"version 2.0.0", b"version 2.0.1", 1))
    return path


def _truncated(setup: Setup, tmp_path: Path) -> Path:
    path = tmp_path / "short.avb"
    path.write_bytes(setup.bundle.read_bytes()[:-1000])
    return path


def _wrong_key(setup: Setup, tmp_path: Path) -> Path:
    private, _public = generate_keypair(tmp_path / "other-key")
    path = tmp_path / "other.avb"
    product = setup.root / "product" / "product-2.0.0.toml"
    avobuild_cli("bundle", "create", product, "-o", path, "--key", private)
    return path


def _wrong_compatible(setup: Setup, tmp_path: Path) -> Path:
    path = tmp_path / "compat.avb"
    image = tmp_path / "rootfs.img"
    image.write_bytes(setup.slot_image)
    avobuild_cli(
        "bundle", "create", "-o", path, "--image", f"rootfs={image}", "--name", "testprod",
        "--version", "2.0.0", "--compatible", "another-board",
        "--key", setup.root / "product" / "keys" / "bundle-signing.key.pem",
    )  # fmt: skip
    return path


REFUSALS = {
    "tampered-payload": (_tampered, "sha256 mismatch", 3),
    "tampered-manifest": (_manifest_tampered, "does not verify", 3),
    "truncated": (_truncated, "truncated at byte offset", 3),
    "wrong-key": (_wrong_key, "none of them trusted", 3),
    "wrong-compatible": (_wrong_compatible, "is for 'another-board'", 4),
}


@pytest.fixture(scope="module")
def bad_bundles(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("bad-bundles")
    return {reason: make(setup, directory) for reason, (make, _, _) in REFUSALS.items()}


@pytest.mark.parametrize("reason", sorted(REFUSALS))
@pytest.mark.parametrize("streaming", [False, True], ids=["file", "stdin"])
def test_refused_bundle_leaves_disk_byte_identical(
    setup: Setup, device: Device, bad_bundles: dict[str, Path], reason: str, streaming: bool
) -> None:
    _, message, code = REFUSALS[reason]
    bundle = bad_bundles[reason]
    disk_before = sha256(device.disk.read_bytes())
    env_before = device.grubenv.read_bytes()
    if streaming:
        result = device.run(
            "apply", "--target", "inactive", "-", stdin=bundle.read_bytes(), check=False
        )
    else:
        result = device.run("apply", "--target", "inactive", "--bundle", bundle, check=False)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    if streaming and reason in ("tampered-payload", "truncated"):
        # A stream is written as it is verified: only the inactive slot may have changed,
        # and it is no longer a boot candidate.
        assert device.boot_state().primary is Slot.A
        assert device.boot_state().slots[Slot.B].version == ""
        assert device.partition(Role.SYSTEM_A) == read_range(
            setup.factory, *_span(setup, Role.SYSTEM_A)
        )
    else:
        assert sha256(device.disk.read_bytes()) == disk_before, "a refused bundle changed the disk"
        assert device.grubenv.read_bytes() == env_before
    assert device.state_value("state") == "Failed"
    if reason == "truncated":
        # The device is still usable: the complete bundle installs afterwards.
        device.run("apply", "--target", "inactive", "-", stdin=setup.bundle.read_bytes())
        assert device.partition(Role.SYSTEM_B)[: len(setup.slot_image)] == setup.slot_image


def _span(setup: Setup, role: Role) -> tuple[int, int]:
    part = setup.plan.by_role(role)
    assert part is not None
    return part.offset, part.size


def test_verify_validate_simulate_write_nothing(setup: Setup, device: Device) -> None:
    disk_before = sha256(device.disk.read_bytes())
    assert "verified: testprod 2.0.0" in device.run("verify", "--bundle", setup.bundle).stdout
    assert "valid: 2.0.0 fits slot B" in device.run("validate", "--bundle", setup.bundle).stdout
    simulated = device.run("simulate", "--bundle", setup.bundle, "--verbose").stdout
    assert "would write image rootfs" in simulated and "system-b" in simulated
    assert sha256(device.disk.read_bytes()) == disk_before
    assert device.grubenv.read_bytes() == setup.grubenv


def _power_cut_run(device: Device, bundle: Path, kill_after: int, streaming: bool) -> None:
    extra = {"AVO_TEST_KILL_AFTER": str(kill_after), "AVO_TEST_COUNTER": str(device.root / "n")}
    (device.root / "n").unlink(missing_ok=True)
    if streaming:
        result = device.run(
            "apply", "--target", "inactive", "-", stdin=bundle.read_bytes(), check=False, **extra
        )
    else:
        result = device.run(
            "apply", "--target", "inactive", "--bundle", bundle, check=False, **extra
        )
    if result.returncode == 0:
        device.run("commit", check=False, **extra)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "delta"])
def test_power_loss_at_seeded_points_keeps_a_bootable_device(
    setup: Setup, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """SIGKILL (a power cut as the applier sees it) after a seeded sample of its write steps,
    for a full bundle and for a delta whose source is the running slot A."""
    bundle: Path = setup.bundle if kind == "full" else request.getfixturevalue("delta_bundle")
    rng = random.Random(20261127)
    # Count the write steps of one uninterrupted apply + commit.
    probe = Device(setup, tmp_path / "probe")
    counter = probe.root / "n"
    extra = {"AVO_TEST_KILL_AFTER": "1000000", "AVO_TEST_COUNTER": str(counter)}
    probe.run("apply", "--target", "inactive", "--bundle", bundle, **extra)
    probe.run("commit", **extra)
    total = int(counter.read_text())
    assert total >= 20, f"only {total} write steps to interrupt"
    # 50 seeded points, or every step when there are fewer
    points = sorted(rng.sample(range(1, total + 1), min(total, 50)))
    factory_a = sha256(read_range(setup.factory, *_span(setup, Role.SYSTEM_A)))
    factory_data = sha256(read_range(setup.factory, *_span(setup, Role.DATA)))
    b_offset, b_size = _span(setup, Role.SYSTEM_B)
    pristine_b = read_range(setup.factory, b_offset, b_size)
    device = Device(setup, tmp_path / "device")
    for number, point in enumerate(points):
        # Back to the factory state (only slot B and the boot state can have changed).
        with device.disk.open("r+b") as handle:
            handle.seek(b_offset)
            handle.write(pristine_b)
        device.grubenv.write_bytes(setup.grubenv)
        shutil.rmtree(device.state, ignore_errors=True)
        device.booted = Slot.A
        device.write_cmdline()
        _power_cut_run(device, bundle, point, streaming=number % 4 != 0)
        slot = device.reboot()
        if device.boot_state().slots[Slot.B].version == "2.0.0":
            # The cut came after commit rewrote the boot state: B is complete and on trial.
            assert slot is Slot.B, point
            assert device.partition(Role.SYSTEM_B)[: len(setup.slot_image)] == setup.slot_image
        else:
            assert slot is Slot.A, point
            assert device.boot_state().slots[Slot.A].ok, point
        assert sha256(device.partition(Role.SYSTEM_A)) == factory_a, point
        assert sha256(device.partition(Role.DATA)) == factory_data, point
        # A retry from wherever the cut left things succeeds (checked at every fifth point
        # to keep the test's runtime reasonable).
        if number % 5 == 0:
            if slot is Slot.A:
                device.run("apply", "--target", "inactive", "-", stdin=bundle.read_bytes())
                device.run("commit")
                assert device.reboot() is Slot.B, point
            device.run("health-check")
            assert device.boot_state().slots[Slot.B].ok, point


def _set_trigger(device: Device, old: str, new: str) -> None:
    """Edit the device's /etc/avocado/rollback.yaml as an operator would."""
    path = device.conf / "rollback.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _committed_and_booted(setup: Setup, device: Device) -> None:
    device.run("apply", "--target", "inactive", "--bundle", setup.bundle)
    device.run("commit")
    assert device.reboot() is Slot.B


def test_dead_critical_service_rolls_back(setup: Setup, device: Device) -> None:
    _set_trigger(
        device,
        "      critical_services: []\n",
        "      critical_services:\n        - no-such-daemon\n",
    )
    _committed_and_booted(setup, device)
    result = device.run("health-check", check=False)
    assert result.returncode == 1
    assert "service_health: no-such-daemon not running after 2 checks" in result.stderr
    assert device.boot_state().primary is Slot.A


def test_running_critical_service_passes(setup: Setup, device: Device) -> None:
    _set_trigger(
        device, "      critical_services: []\n", "      critical_services:\n        - sleep\n"
    )
    _committed_and_booted(setup, device)
    sleeper = subprocess.Popen([f"{setup.busybox_path}/sleep", "30"])
    try:
        assert "confirmed slot B" in device.run("health-check").stdout
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("exit_code", [0, 1])
def test_app_validation_script_decides(setup: Setup, device: Device, exit_code: int) -> None:
    script = device.root / "validate-system"
    script.write_text(f"#!/bin/sh\necho validating\nexit {exit_code}\n")
    script.chmod(0o755)
    _set_trigger(
        device,
        "      enabled: false\n      script: /usr/local/bin/validate-system\n",
        f"      enabled: true\n      script: {script}\n",
    )
    _committed_and_booted(setup, device)
    result = device.run("health-check", check=False)
    assert result.returncode == exit_code
    state = device.boot_state()
    if exit_code == 0:
        assert state.primary is Slot.B and state.slots[Slot.B].ok
    else:
        assert "app_validation" in result.stderr and state.primary is Slot.A


def test_failing_post_update_hook_rolls_back(setup: Setup, device: Device) -> None:
    hook = device.conf / "post-update.d" / "10-smoke"
    hook.write_text("#!/bin/sh\nexit 3\n")
    hook.chmod(0o755)
    _committed_and_booted(setup, device)
    result = device.run("health-check", check=False)
    assert result.returncode == 1 and "post-update hook" in result.stderr


def test_download_resumes_then_applies(setup: Setup, device: Device, tmp_path: Path) -> None:
    served = tmp_path / "www"
    served.mkdir()
    shutil.copyfile(setup.bundle, served / "update-2.0.0.avb")
    port = 20000 + random.Random(os.getpid()).randrange(20000)
    server = subprocess.Popen(
        [f"{setup.busybox_path}/httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(served)]
    )
    try:
        target = device.root / "update-2.0.0.avb"
        target.write_bytes(setup.bundle.read_bytes()[:5000])  # an interrupted download
        for _ in range(50):
            result = device.run(
                "download", "--url", f"http://127.0.0.1:{port}/update-2.0.0.avb", "-o", target,
                check=False,
            )  # fmt: skip
            if result.returncode == 0:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert result.returncode == 0, result.stderr
    finally:
        server.kill()
        server.wait()
    assert target.read_bytes() == setup.bundle.read_bytes()
    assert "verified" in device.run("verify", "--bundle", target).stdout
    device.run("apply", "--target", "inactive")  # the downloaded bundle, as documented
    assert device.state_value("step") == "applied"


def test_pre_check_reads_power_and_network(device: Device) -> None:
    supply = device.sys / "class" / "power_supply"
    (supply / "BAT0").mkdir(parents=True)
    (supply / "BAT0" / "type").write_text("Battery\n")
    (supply / "BAT0" / "capacity").write_text("12\n")
    (supply / "AC").mkdir()
    (supply / "AC" / "type").write_text("Mains\n")
    (supply / "AC" / "online").write_text("0\n")
    result = device.run("pre-check", check=False)
    assert result.returncode == 1
    assert "FAIL Battery: 12% and no AC (at least 20% needed)" in result.stdout
    assert "ok Network: connected ( eth0 )" in result.stdout
    assert "ok Disk space" in result.stdout
    (supply / "AC" / "online").write_text("1\n")
    (device.sys / "class" / "net" / "eth0" / "operstate").write_text("down\n")
    result = device.run("pre-check", check=False)
    assert "ok Power: AC connected, battery 12%" in result.stdout
    assert "FAIL Network: no interface is up" in result.stdout


def test_history_and_monitor(setup: Setup, device: Device) -> None:
    assert "no updates recorded" in device.run("history").stdout
    device.run("apply", "--target", "inactive", "--bundle", setup.bundle)
    history = device.run("history").stdout
    assert "\tapply\t2.0.0 slot=B" in history and "\tstate\t" not in history
    assert "\tstate\tVerifying" in device.run("history", "--verbose").stdout
    assert " state Applying since " in device.run("monitor").stdout
    follow = subprocess.Popen(
        [f"{setup.busybox_path}/sh", str(setup.rendered / "usr/sbin/avocado-update"),
         "monitor", "--follow"],
        stdout=subprocess.PIPE, text=True, env=device.env(AVO_MONITOR_INTERVAL="0.2"),
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        assert "state Applying" in follow.stdout.readline()
        device.run("commit")
        assert "state Testing" in follow.stdout.readline()
    finally:
        follow.kill()
        follow.wait()


UBOOT_APPLIER = """
[applier]
bootloader = "u-boot"
init = "busybox"
target-tools = ["busybox", "openssl", "zstd", "fw_printenv", "fw_setenv"]
uboot-env-redundant = true
"""


def test_uboot_device_install_fallback_and_confirm(setup: Setup, tmp_path: Path) -> None:
    from avobuild.boot.uboot import read_uboot_env, render_redundant_pair

    recipe_path = setup.root / "product" / "uboot.toml"
    recipe_text = (setup.root / "product" / "product-1.0.0.toml").read_text()
    recipe_path.write_text(recipe_text.replace(ROLLBACK, "") + UBOOT_APPLIER)
    rendered = tmp_path / "rendered"
    render_applier(load_recipe(recipe_path), rendered)
    bin_dir = Path(setup.busybox_path)
    for tool in ("fw_printenv", "fw_setenv"):
        if not (bin_dir / tool).exists():
            found = shutil.which(tool)
            assert found is not None
            (bin_dir / tool).symlink_to(found)
    device = Device(setup, tmp_path / "device")
    env_file = device.root / "uboot-env.bin"
    variables = parse_grubenv(setup.grubenv)
    first, second = render_redundant_pair(variables, 0x4000)
    env_file.write_bytes(first + second)
    config = device.root / "fw_env.config"
    config.write_text(f"{env_file} 0x0 0x4000\n{env_file} 0x4000 0x4000\n")

    def run(*args: str | Path) -> str:
        result = subprocess.run(
            [f"{setup.busybox_path}/sh", rendered / "usr/sbin/avocado-update", *args],
            capture_output=True, text=True, check=False,
            env=device.env(AVO_FW_CONFIG=str(config)),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    def env_now() -> dict[str, str]:
        data = env_file.read_bytes()
        return read_uboot_env(data[:0x4000], data[0x4000:])

    def uboot_boot() -> Slot:
        """Play U-Boot's boot.cmd rule; saveenv is fw_setenv here."""
        slot, saved = trial_boot(env_now())
        changed = [f"{k}={v}" for k, v in saved.items() if env_now().get(k) != v]
        if changed:
            script = device.root / "saveenv.txt"
            script.write_text("".join(line + "\n" for line in changed))
            subprocess.run(["fw_setenv", "-c", str(config), "-s", str(script)], check=True)
        device.booted = slot
        device.write_cmdline()
        run("boot")
        return slot

    run("apply", "--target", "inactive", "--bundle", setup.bundle)
    run("commit")
    assert env_now()["avo_primary"] == "B" and env_now()["avo_B_tries"] == "3"
    assert device.partition(Role.SYSTEM_B)[: len(setup.slot_image)] == setup.slot_image
    assert [uboot_boot() for _ in range(4)] == [Slot.B, Slot.B, Slot.B, Slot.A]
    assert env_now()["avo_primary"] == "A"
    assert "rollback\tboot_failure" in device.history()
    # A second attempt is confirmed by the health check.
    run("apply", "--target", "inactive", "--bundle", setup.bundle)
    run("commit")
    assert uboot_boot() is Slot.B
    assert "confirmed slot B" in run("health-check")
    assert env_now()["avo_B_ok"] == "1"


@pytest.fixture(scope="module")
def policy_bundles(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Version 2 manifests: compatible glob, security-version, min-applier, expiry, encryption."""
    directory = tmp_path_factory.mktemp("policy")
    image = directory / "rootfs.img"
    image.write_bytes(setup.slot_image)
    (directory / "content.key").write_text("11" * 32 + "\n")
    key = setup.root / "product" / "keys" / "bundle-signing.key.pem"
    variants = {
        "glob-sv5": ["--compatible", "testprod-*", "--security-version", "5"],
        "sv3": ["--compatible", "testprod-x86_64", "--security-version", "3"],
        "new-applier": ["--compatible", "testprod-x86_64", "--min-applier-version", "99.1"],
        "expired": ["--compatible", "testprod-x86_64", "--expires", "1000"],
        "other-glob": ["--compatible", "otherprod-*", "--security-version", "5"],
        "encrypted": [
            "--compatible", "testprod-x86_64", "--encryption-key", directory / "content.key",
        ],
    }  # fmt: skip
    bundles = {}
    for name, options in variants.items():
        bundle = directory / f"{name}.avb"
        avobuild_cli(
            "bundle", "create", "-o", bundle, "--image", f"rootfs={image}", "--name", "testprod",
            "--version", f"3.0.0-{name}", "--key", key, "--chunk-size", "1M", *options,
        )  # fmt: skip
        bundles[name] = bundle
    return bundles


def test_security_version_floor_rises_on_confirm(
    setup: Setup, device: Device, policy_bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = policy_bundles["glob-sv5"]
    device.run("apply", "--target", "inactive", "--bundle", bundle)
    device.run("commit")
    # Same boot state bytes as the reference installer, security versions included.
    reference = tmp_path / "reference.img"
    shutil.copyfile(setup.factory, reference)
    result = install_bundle(bundle, reference, setup.keyring)
    assert device.grubenv.read_bytes() == render_grubenv(result.state.to_variables())
    assert device.boot_state().security_version == 0, "the floor rises only on confirm"
    device.reboot()
    device.run("health-check")
    state = device.boot_state()
    assert state.security_version == 5 and state.slots[Slot.B].security_version == 5
    refused = device.run(
        "apply", "--target", "inactive", "--bundle", policy_bundles["sv3"], check=False
    )
    assert refused.returncode == 4
    assert "security-version 3 is below this device's floor 5" in refused.stderr


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("new-applier", "needs applier version 99.1"),
        ("expired", "expired at 1000"),
        ("other-glob", "is for 'otherprod-*'"),
        ("encrypted", "encrypted bundles are not supported by this applier yet"),
    ],
)
def test_manifest_policy_refusals_leave_disk_unchanged(
    device: Device, policy_bundles: dict[str, Path], name: str, message: str
) -> None:
    disk_before = sha256(device.disk.read_bytes())
    result = device.run(
        "apply", "--target", "inactive", "--bundle", policy_bundles[name], check=False
    )
    assert result.returncode in (3, 4) and message in result.stderr, result.stderr
    assert sha256(device.disk.read_bytes()) == disk_before
    assert device.grubenv.read_bytes() == device.setup.grubenv


@pytest.fixture(scope="module")
def delta_bundle(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A delta from what the factory's slot A holds (1.0.0) to the 2.0.0 bundle."""
    directory = tmp_path_factory.mktemp("delta")
    slot_a = setup.plan.by_role(Role.SYSTEM_A)
    assert slot_a is not None
    # The factory slot holds the 1.0.0 rootfs image followed by zeros up to the partition end.
    v1_image = directory / "rootfs-1.0.0.img"
    v1_image.write_bytes(read_range(setup.factory, slot_a.offset, len(setup.slot_image)))
    key = setup.root / "product" / "keys" / "bundle-signing.key.pem"
    v1 = directory / "v1.avb"
    avobuild_cli(
        "bundle", "create", "-o", v1, "--image", f"rootfs={v1_image}", "--name", "testprod",
        "--version", "1.0.0", "--compatible", "testprod-x86_64", "--key", key,
        "--chunk-size", "512K",
    )  # fmt: skip
    delta = directory / "v1-to-v2.avb"
    avobuild_cli("delta", "create", "--from", v1, "--to", setup.bundle, "-o", delta, "--key", key)
    assert delta.stat().st_size < setup.bundle.stat().st_size
    return delta


@pytest.mark.parametrize("streaming", [False, True], ids=["file", "stdin"])
def test_delta_bundle_writes_the_same_slot_bytes(
    setup: Setup, device: Device, delta_bundle: Path, streaming: bool
) -> None:
    if streaming:
        device.run("apply-delta", "-", stdin=delta_bundle.read_bytes())
    else:
        device.run("apply-delta", "--delta", delta_bundle, "--verify")
    assert device.partition(Role.SYSTEM_B)[: len(setup.slot_image)] == setup.slot_image
    device.run("commit")
    assert device.reboot() is Slot.B
    device.run("health-check")
    device.run("verify-partition", "--partition", "active")


def test_delta_for_another_source_is_refused_untouched(
    setup: Setup, device: Device, delta_bundle: Path
) -> None:
    slot_a = setup.plan.by_role(Role.SYSTEM_A)
    assert slot_a is not None
    with device.disk.open("r+b") as handle:  # the running slot holds something else
        handle.seek(slot_a.offset + 5000)
        handle.write(b"locally modified")
    disk_before = sha256(device.disk.read_bytes())
    result = device.run("apply", "--target", "inactive", "--bundle", delta_bundle, check=False)
    assert result.returncode == 4
    assert "needs a source the running slot does not hold" in result.stderr
    assert sha256(device.disk.read_bytes()) == disk_before


@pytest.fixture(scope="module")
def big_op_deltas(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Deltas from slot A whose one copy (or zero) operation is 20 MiB, more than the tmpfs."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from hostile_bundles import Op, delta_draft, ed25519_signer, frame, stream_bytes
    from hostile_bundles import Ref as StreamRef

    from avobuild.bundle.keys import load_private_key

    directory = tmp_path_factory.mktemp("big-ops")
    key = load_private_key(setup.root / "product" / "keys" / "bundle-signing.key.pem")
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    source = device_slot_a(setup)
    big = 20 << 20
    patch = random.Random(9).randbytes(4096)
    rest = len(source) - big - len(patch)
    layouts = {
        "copy": (
            [Op(f"copy 0 {big} 0 {sha256(source[:big])}".encode())],
            source[:big],
            [Op(f"zero {big + len(patch)} {rest}".encode())],
            bytes(rest),
        ),
        "zero": (
            [Op(f"zero 0 {big}".encode())],
            bytes(big),
            [Op(f"copy {big + len(patch)} {rest} 0 {sha256(source[:rest])}".encode())],
            source[:rest],
        ),
    }
    bundles = {}
    for name, (before, head, after, tail) in layouts.items():
        payload = frame(patch)
        middle = Op(f"data {big} 4096 {len(payload)} {sha256(patch)}".encode(), payload)
        target = head + patch + tail
        source_ref, target_ref = (
            StreamRef(len(source), sha256(source)),
            StreamRef(len(target), sha256(target)),
        )
        stream = stream_bytes(source_ref, target_ref, [*before, middle, *after])
        draft = delta_draft(stream, source_ref, target_ref, (ed25519_signer(key),))
        draft.lines[2:5] = [b"name testprod", b"version 2.0.0", b"compatible testprod-x86_64"]
        bundles[name] = directory / f"{name}.avb"
        bundles[name].write_bytes(draft.render())
        (directory / f"{name}.target").write_bytes(target)
    return bundles


def device_slot_a(setup: Setup) -> bytes:
    return read_range(setup.factory, *_span(setup, Role.SYSTEM_A))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a size-limited tmpfs needs root")
@pytest.mark.parametrize("operation", ["copy", "zero"])
@pytest.mark.parametrize("streaming", [False, True], ids=["file", "stdin"])
def test_delta_install_needs_at_most_16_mib_of_temporary_space(
    device: Device, big_op_deltas: dict[str, Path], tmp_path: Path, streaming: bool, operation: str
) -> None:
    """Copy and zero operations go from device to device, so a delta whose one operation is
    20 MiB installs with $TMPDIR on a 16 MiB tmpfs (the applier once staged each operation
    there: the demo's delta needed 128 MiB)."""
    bundle = big_op_deltas[operation]
    work = tmp_path / "tmpfs"
    work.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(work)], check=True)
    try:
        if streaming:
            device.run("apply", "-", stdin=bundle.read_bytes(), AVO_TMPDIR=str(work))
        else:
            device.run("apply", "--bundle", bundle, AVO_TMPDIR=str(work))
        assert list(work.iterdir()) == [], "the applier cleans up its work directory"
    finally:
        subprocess.run(["umount", str(work)], check=True)
    target = bundle.with_suffix(".target").read_bytes()
    assert device.partition(Role.SYSTEM_B)[: len(target)] == target


def _mbr_disk(disk: Path) -> None:
    """An MBR partition table where the GPT was: a Linux partition record, no GPT header."""
    with disk.open("r+b") as handle:
        handle.seek(446)
        handle.write(bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") * 2)
        handle.seek(512)
        handle.write(bytes(512))


def _truncated_disk(disk: Path) -> None:
    with disk.open("r+b") as handle:
        handle.truncate(disk.stat().st_size - (6 << 20))  # inside the data partition


def _moved_partition(disk: Path) -> None:
    """Entry 3 (system-b) starts 1 MiB later; CRCs are not the applier's business."""
    with disk.open("r+b") as handle:
        handle.seek(1024 + 2 * 128 + 32)
        first = int.from_bytes(handle.read(8), "little")
        handle.seek(1024 + 2 * 128 + 32)
        handle.write((first + 2048).to_bytes(8, "little"))


def _renamed_partition(disk: Path) -> None:
    with disk.open("r+b") as handle:
        handle.seek(1024 + 2 * 128 + 56)
        handle.write("system-x".encode("utf-16-le"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_mbr_disk, "its protective-MBR (byte offset 450) differs"),
        (_truncated_disk, "shorter than its partition table says"),
        (_moved_partition, "its GPT-entry-3 (byte offset 1280) differs"),
        (_renamed_partition, "its GPT-entry-3 (byte offset 1280) differs"),
    ],
    ids=["mbr", "truncated", "moved", "renamed"],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["file", "stdin"])
def test_disk_not_holding_the_rendered_layout_is_refused_before_any_write(
    setup: Setup, device: Device, damage: object, message: str, streaming: bool
) -> None:
    assert callable(damage)
    damage(device.disk)
    size_before = device.disk.stat().st_size
    disk_before = sha256(device.disk.read_bytes())
    if streaming:
        result = device.run("apply", "-", stdin=setup.bundle.read_bytes(), check=False)
    else:
        result = device.run("apply", "--bundle", setup.bundle, check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "nothing was written" in result.stderr
    assert device.disk.stat().st_size == size_before, "a refused disk image never grows"
    assert sha256(device.disk.read_bytes()) == disk_before
    assert device.grubenv.read_bytes() == setup.grubenv


def _fake_block_devices(device: Device, setup: Setup, *, shift: int = 0) -> None:
    """/sys/class/block entries for each partition, as the kernel shows them (512-byte units)."""
    for part in setup.plan.partitions:
        entry = device.sys / "class" / "block" / f"vda{part.number}"
        entry.mkdir(parents=True)
        (entry / "uevent").write_text(f"DEVNAME=vda{part.number}\nPARTNAME={part.spec.label}\n")
        start = part.offset // 512 + (shift if part.spec.label == "system-b" else 0)
        (entry / "start").write_text(f"{start}\n")
        (entry / "size").write_text(f"{part.size // 512}\n")


@pytest.mark.parametrize("shift", [0, 2048])
def test_partition_devices_are_checked_by_their_kernel_geometry(
    setup: Setup, device: Device, shift: int
) -> None:
    """Without AVO_DISK each slot is a partition device found by name in sysfs; its start and
    size there must be the layout's."""
    _fake_block_devices(device, setup, shift=shift)
    result = device.run("validate", "--bundle", setup.bundle, check=False, AVO_DISK="")
    if shift:
        assert result.returncode == 1
        assert "/dev/vda3 (system-b): not where the layout puts it" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "image rootfs" in result.stdout and "-> system-b" in result.stdout


def _with_block(setup: Setup, tmp_path: Path, extra: bytes) -> Path:
    """The bundle with lines added to its (unsigned) signature block."""
    data = setup.bundle.read_bytes()
    manifest_size, block_size = int(data[12:22]), int(data[23:33])
    block = data[34 + manifest_size : 34 + manifest_size + block_size] + extra
    path = tmp_path / "hostile.avb"
    path.write_bytes(
        b"AVOBUNDLE 1 %010d %010d\n" % (manifest_size, len(block))
        + data[34 : 34 + manifest_size]
        + block
        + data[34 + manifest_size + block_size :]
    )
    return path


HOSTILE_BLOCKS = {
    "escape-key-id": b"signature ed25519 \x1b]0;owned\x07\x1b[2J" + b"a" * 40 + b" AAAA\n",
    "0xff": b'comment \xff\xfe"\\\n',
    "12787-short-lines": b"".join(
        b"signature e %s AAAA\n" % random.Random(line).randbytes(32).hex().encode()
        for line in range(12787)
    ),
}


@pytest.mark.parametrize("hostile", sorted(HOSTILE_BLOCKS))
def test_untrusted_text_is_never_echoed_raw_and_state_stays_small(
    setup: Setup, device: Device, tmp_path: Path, hostile: str
) -> None:
    bundle = _with_block(setup, tmp_path, HOSTILE_BLOCKS[hostile][: (1 << 20) - 300])
    for _ in range(3):  # refused again and again: nothing accumulates beyond the bounds
        result = device.run("apply", "--bundle", bundle, check=False)
        assert result.returncode == 3
    outputs = [result.stderr.encode("latin-1"), (device.state / "state").read_bytes()]
    outputs.append((device.state / "history").read_bytes())
    for output in outputs:
        assert not set(output) - set(b"\t\n" + bytes(range(0x20, 0x7F))), output[:300]
    assert len(result.stderr) <= 1100
    assert (device.state / "state").stat().st_size < 4096
    assert (device.state / "history").stat().st_size < 4096
    report = json.loads(device.run("report", "--format", "json").stdout)
    assert report["state"] == "Failed"


def test_history_is_rotated_and_report_is_valid_json_whatever_it_holds(device: Device) -> None:
    device.state.mkdir(parents=True)
    # Lines as an older applier (or a damaged file) may have left them: raw bytes, quotes,
    # backslashes, escapes, a huge detail.
    hostile = (
        b'2026-01-01T00:00:00Z\tapply\t2.0.0 "quoted" back\\slash \x1b[31mred \xff\xfe\x00nul\n'
        b"2026-01-02T00:00:00Z\tstate\t" + b"x" * 5000 + b"\n"
        b'2026-01-03T00:00:00Z\t"event\t\\detail\\\n'
    )
    (device.state / "history").write_bytes(hostile * 30)
    (device.state / "state").write_bytes(b'state=Idle\nreason=a "b" \\c \x1b\xff\n')
    report = json.loads(device.run("report", "--format", "json").stdout)
    assert len(report["events"]) >= 90  # busybox awk may end a record at a NUL byte
    assert report["events"][0]["detail"].startswith('2.0.0 "quoted" back\\slash ?[31mred ??')
    assert all(
        set(event["detail"]) <= set(map(chr, range(0x20, 0x7F))) for event in report["events"]
    )
    # The next event rotates the oversized file; history keeps reading both generations.
    device.run("backup", "--output", device.root / "b.tar")
    assert (device.state / "history.1").read_bytes() == hostile * 30
    assert (device.state / "history").read_bytes().count(b"\n") == 1
    history = device.run("history", "--verbose").stdout
    assert "\tbackup\t" in history and "\x1b" not in history and "\xff" not in history
    report = json.loads(device.run("report", "--format", "json").stdout)
    assert report["events"][-1]["event"] == "backup"


MBR_APPLIER = '\n[applier]\ndisk = "/dev/mmcblk0"\n'


def _mbr_product(root: Path) -> Product:
    """The test product on an MBR: data and recovery become logical partitions 5 and 6."""
    product = write_product(root / "product", version="1.0.0")
    layout = product.layout.read_text().replace('table = "gpt"', 'table = "mbr"')
    layout = layout.replace('"root-x86-64"', '"linux"').replace('"linux-generic"', '"linux"')
    product.layout.write_text(layout)
    return product


@dataclass(frozen=True)
class MbrSetup:
    factory: Path
    script: Path
    grubenv: bytes
    plan: DiskPlan


@pytest.fixture(scope="module")
def mbr_setup(tmp_path_factory: pytest.TempPathFactory) -> MbrSetup:
    root = tmp_path_factory.mktemp("mbr")
    product = _mbr_product(root)
    with product.recipe.open("a") as handle:
        handle.write(MBR_APPLIER)
    recipe = load_recipe(product.recipe)
    image = build_factory_image(recipe, root / "out", root / "work")
    render_applier(recipe, root / "rendered")
    plan = plan_layout(recipe.layout)
    boot = plan.by_role(Role.BOOT)
    assert boot is not None
    grubenv = read_vfat_file(image.path, boot.offset, BOOT_STATE_PATH)
    return MbrSetup(image.path, root / "rendered" / SCRIPT_PATH, grubenv, plan)


def test_mbr_disk_is_checked_record_by_record(
    setup: Setup, mbr_setup: MbrSetup, tmp_path: Path
) -> None:
    assert "TABLE_TYPE='mbr'" in mbr_setup.script.read_text()
    device = Device(setup, tmp_path / "device")
    shutil.copyfile(mbr_setup.factory, device.disk)
    device.grubenv.write_bytes(mbr_setup.grubenv)

    def apply(applier: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [f"{setup.busybox_path}/sh", str(applier), "apply", "--bundle", str(setup.bundle)],
            capture_output=True, text=True, env=device.env(), check=False,
        )  # fmt: skip

    # The GPT product's applier on this disk: refused before any write.
    before = sha256(device.disk.read_bytes())
    refused = apply(setup.rendered / SCRIPT_PATH)
    assert refused.returncode == 1 and "its protective-MBR" in refused.stderr, refused.stderr
    assert sha256(device.disk.read_bytes()) == before
    # A damaged EBR (the one of partition 6): refused too.
    last = mbr_setup.plan.partitions[-1]
    assert last.number == 6 and last.ebr_lba is not None
    with device.disk.open("r+b") as handle:
        handle.seek(last.ebr_lba * 512 + 446 + 8)  # the start LBA of its record
        handle.write(b"\x01")
    damaged = apply(mbr_setup.script)
    assert damaged.returncode == 1 and "its EBR-6" in damaged.stderr, damaged.stderr
    # The disk as built: the update installs into slot B (partition 3).
    shutil.copyfile(mbr_setup.factory, device.disk)
    assert apply(mbr_setup.script).returncode == 0
    slot_b = mbr_setup.plan.by_role(Role.SYSTEM_B)
    assert slot_b is not None and slot_b.number == 3
    assert read_range(device.disk, slot_b.offset, len(setup.slot_image)) == setup.slot_image


def test_mbr_layout_needs_the_applier_disk(tmp_path: Path) -> None:
    product = _mbr_product(tmp_path)
    with pytest.raises(RecipeError, match=r"\[applier\] disk: missing; the partitions of an MBR"):
        render_applier(load_recipe(product.recipe), tmp_path / "out")
