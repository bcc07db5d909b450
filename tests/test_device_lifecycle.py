"""The demo device's whole life in QEMU (UEFI, software emulation), driven over its serial
console, as mkosi and RAUC test themselves:

  boot A 1.0.0, write a file to /data
  -> full bundle 1.1.0 into B, reboot, trial boot, health check confirms B
  -> delta bundle 1.1.0 -> 1.2.0 into A, reboot, health check confirms A
  -> 1.3.0, whose application self-test fails: the health check rolls back to A by itself
  -> 1.4.0, whose init crashes (kernel panic): every trial boot panics, GRUB falls back to A
  -> the network: the device's agent asks the host's `avobuild serve` (user-mode networking,
     mutual TLS): a device outside the 10 % rollout is not offered 1.5.0 until it is promoted
     to 100 %, the device waits outside its update window, then finds 1.5.0 by itself and
     downloads the delta; the network is cut in the middle of it, and the next agent pass
     resumes it with a Range request from the partial file; it installs, reboots, confirms;
     `fleet report` shows its download, apply and boot times, the confirmation and the
     rollbacks of 1.3.0 and 1.4.0
  -> the /data file is intact (read back on the host with debugfs)
  -> the disk is broken; the USB recovery stick restores the factory image; A 1.0.0 boots.

One QEMU machine runs the updates: the guest reboots itself (commit, health check, panic=N),
the test's QEMU helper powers it on again at each reset (same disk and UEFI variables) and
otherwise only watches the console. The bundles reach the guest on a second virtio disk (an
ext4 "update stick" made with mke2fs -d).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import REPO, avobuild_cli
from elf_edits import host_elf_files, recompile
from test_device_boot import ext4_dump, partition_bytes
from test_fleet_support import Pki, index_key, leaf, make_pki, running_server
from test_media_boot import MENU, POWER_OFF, Qemu, qemu, restore_factory_image, uefi_args

from avobuild.applier.render import write_key_files
from avobuild.bundle.keys import load_keyring
from avobuild.bundle.reader import BundleReader
from avobuild.delta.apply import image_chunks

pytestmark = pytest.mark.slow

DEMO = REPO / "recipes" / "demo.toml"
DEMO_V2 = REPO / "recipes" / "demo-v2.toml"
KEY = REPO / "keys-example" / "insecure-example.key.pem"
MARKER = b"AVOBUILD-BOOT-OK"
DATA_FILE = "lifecycle/keep.bin"
MEDIA = "/run/updates"
SAMPLE_LIBRARIES = "/usr/lib/avobuild-demo"


def demo_variant(
    tmp_path: Path,
    version: str,
    *,
    files: dict[str, str] | None = None,
    binaries: dict[str, bytes] | None = None,
    app_validation: bool = False,
    base: Path = DEMO_V2,
    layout: Path | None = None,
) -> Path:
    """A demo recipe (`base`, demo-v2.toml by default) at another version, with extra rootfs
    files (dest -> text or, in `binaries`, bytes; mode 0755), optionally the application
    self-test enabled and another layout; written to tmp_path."""
    recipe: dict[str, Any] = tomllib.loads(base.read_text())

    def absolute(value: str) -> str:
        return str((base.parent / value).resolve())

    recipe["product"]["version"] = version
    recipe["product"]["layout"] = str(layout or absolute(recipe["product"]["layout"]))
    recipe["rootfs"]["tree"] = absolute(recipe["rootfs"]["tree"])
    for entry in recipe["rootfs"]["file"]:
        entry["source"] = absolute(entry["source"])
    recipe["kernel"]["file"] = absolute(recipe["kernel"]["file"])
    for extension in recipe["extension"]:
        extension["tree"] = absolute(extension["tree"])
    recipe["data"]["tree"] = absolute(recipe["data"]["tree"])
    recipe["signing"]["key"] = absolute(recipe["signing"]["key"])
    if "target" in recipe:
        recipe["target"]["sysroot"] = absolute(recipe["target"]["sysroot"])
    sources = tmp_path / f"files-{version}"
    sources.mkdir()
    motd = sources / "motd"
    motd.write_text(f"avobuild demo {version}\n")
    extra = {"/etc/motd": motd}
    contents = {dest: text.encode() for dest, text in (files or {}).items()}
    for index, (dest, data) in enumerate({**contents, **(binaries or {})}.items()):
        source = sources / f"file-{index}"
        source.write_bytes(data)
        extra[dest] = source
    recipe["rootfs"]["file"] = [
        entry for entry in recipe["rootfs"]["file"] if entry["dest"] not in extra
    ] + [
        {"source": str(source), "dest": dest, "mode": "0755" if dest != "/etc/motd" else "0644"}
        for dest, source in extra.items()
    ]
    recipe["rollback"]["app_validation"]["enabled"] = app_validation
    path = tmp_path / f"demo-{version}.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


# 1.3.0: the application's self-test fails, so the post-boot health check must roll back.
FAILING_SELF_TEST = """#!/bin/sh
echo "demo-app 1.3.0: self-test failed: cannot open /data/config/app.db" >&2
exit 1
"""
# 1.4.0: init exits at once; PID 1 exiting is a kernel panic ("Attempted to kill init!").
CRASHING_INIT = """#!/bin/sh
echo "demo 1.4.0: init cannot start"
exit 1
"""


# --- the network stage: a fleet repository, its server and what the device is provisioned with
NETWORK_VERSION = "1.5.0"
HOST_FROM_GUEST = "10.0.2.2"  # QEMU user-mode networking: the host's loopback
DEMO_PUBLIC = REPO / "keys-example" / "insecure-example.pub.pem"
MODULES = ("failover", "net_failover", "virtio_net")  # modules; virtio_pci is loaded already
NET_UP = (
    "for m in " + " ".join(MODULES) + f"; do insmod {MEDIA}/fleet/modules/$m.ko; done; "
    "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0"
)


def bucket(device: str, version: str) -> int:
    """docs/repository-format.md section 6, written out again."""
    digest = hashlib.sha256(f"avobuild-rollout 1 {version} {device}".encode()).hexdigest()
    return int(digest[:8], 16) % 10000


def fleet_ids() -> tuple[str, str]:
    """A device id inside a 10 % rollout of NETWORK_VERSION and one outside it."""
    ids = [f"demo-{n}" for n in range(1000)]
    inside = next(i for i in ids if bucket(i, NETWORK_VERSION) < 1000)
    outside = next(i for i in ids if bucket(i, NETWORK_VERSION) >= 1000)
    return inside, outside


def agent_conf(port: int, directory: str, window: str) -> str:
    return f"""[Fleet]
Organization = avobuild
Product = demo
Cohort = stable
[Connection]
Endpoint = https://{HOST_FROM_GUEST}:{port}
Certificate = {directory}/device.crt
Key = {directory}/device.key
ServerCA = {directory}/fleet-ca.crt
IndexKeys = {directory}/index-keys
IndexThreshold = 1
Timeout = 900
[Updates]
CheckInterval = 3600
RandomDelay = 0
AutoDownload = true
AutoApply = true
UpdateWindow = {window}
"""


def telemetry_yaml(enabled: bool) -> str:
    items = "".join(
        f"    - {item}\n"
        for item in (
            "download_time",
            "apply_time",
            "boot_time",
            "validation_results",
            "rollback_events",
            "error_logs",
        )
    )
    return (
        f"metrics:\n  enabled: {'true' if enabled else 'false'}\n  collect:\n{items}"
        "  reporting:\n    interval: 1s\n    interval_seconds: 1\n    on_failure: immediate\n"
    )


def prepare_fleet(tmp_path: Path, full_v12: Path, stick: Path) -> tuple[Path, Pki]:
    """A repository with 1.2.0 at 100 % and 1.5.0 at 10 % of channel stable and the delta
    between them; the PKI (the server's certificate also names 10.0.2.2)."""
    repository = tmp_path / "repo"
    key = index_key(tmp_path / "index-keys")
    avobuild_cli(
        "repo", "init", repository, "--name", "demo", "--bundle-keyring", DEMO_PUBLIC,
        "--key", key, "--delta-key", KEY,
    )  # fmt: skip
    v15 = tmp_path / f"demo-{NETWORK_VERSION}.avb"
    # 256 KiB that do not compress: a delta long enough to be cut in the middle.
    blob = {"/usr/share/avobuild-demo/network.bin": random.Random(15).randbytes(256 << 10)}
    avobuild_cli(
        "bundle", "create", demo_variant(tmp_path, NETWORK_VERSION, binaries=blob), "-o", v15
    )
    avobuild_cli("repo", "add", repository, full_v12, "--channel", "stable")
    avobuild_cli("repo", "add", repository, v15, "--channel", "stable", "--percent", "10")
    delta = tmp_path / "network-delta.avb"
    avobuild_cli("repo", "deltas", repository, "--pair", f"1.2.0:{NETWORK_VERSION}", "-o", delta)
    avobuild_cli("repo", "add", repository, delta)
    pki = make_pki(tmp_path / "pki", list(fleet_ids()))
    leaf(
        pki.root, "server", "server-ca", "/CN=localhost", "serverAuth",
        f"DNS:localhost,IP:127.0.0.1,IP:{HOST_FROM_GUEST}",
    )  # fmt: skip
    fleet = stick / "fleet"
    (fleet / "modules").mkdir(parents=True)
    for module in MODULES:
        found = next((REPO / "build" / "debian" / "modules").glob(f"*/kernel/**/{module}.ko"))
        shutil.copyfile(found, fleet / "modules" / f"{module}.ko")
    write_key_files([key.with_name("index.pub.pem")], fleet / "index-keys")
    shutil.copyfile(pki.server_ca, fleet / "fleet-ca.crt")
    return repository, pki


class CuttingProxy:
    """A TCP relay to the server (TLS passes through it untouched) that, once armed, ends the
    next connection whose answer passes `limit` bytes, after exactly `limit` bytes: the
    network cut in the middle of the only answer that long, the bundle download."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.limit = 0
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, limit: int) -> None:
        self.limit = limit

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answer: bool) -> None:
        sent = 0
        try:
            while chunk := source.recv(65536):
                if answer and self.limit and sent + len(chunk) > self.limit:
                    sink.sendall(chunk[: self.limit - sent])
                    self.limit = 0
                    self.cut.set()
                    break
                sink.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def provision(stick: Path, pki: Pki, ports: tuple[int, int], window: str) -> None:
    """What provisioning writes per device: its certificate, key and agent configuration
    (the device copies `fleet/inside` to /data/avocado; `outside` is used from the stick);
    `ports`: the server's port each of them is given."""
    for name, device, enabled, port in zip(
        ("inside", "outside"), fleet_ids(), (True, False), ports, strict=True
    ):
        directory = stick / "fleet" / name
        directory.mkdir()
        certificate, key = pki.device(device)
        shutil.copyfile(certificate, directory / "device.crt")
        shutil.copyfile(key, directory / "device.key")
        where = "/data/avocado" if name == "inside" else f"{MEDIA}/fleet/outside"
        (directory / "agent.conf").write_text(agent_conf(port, where, window))
        (directory / "update-telemetry.yaml").write_text(telemetry_yaml(enabled))
        shutil.copyfile(stick / "fleet" / "fleet-ca.crt", directory / "fleet-ca.crt")
        shutil.copytree(stick / "fleet" / "index-keys", directory / "index-keys")


def make_stick(stick: Path, image: Path) -> None:
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-E", "root_owner=0:0", "-d", str(stick), str(image), "96M"],
        check=True,
    )


def delta_operations(bundle: Path) -> bytes:
    """The rootfs delta stream of a delta bundle (its lines and payloads, joined)."""
    with BundleReader.open(bundle) as reader:
        reader.verify_signature(load_keyring(REPO / "keys-example" / "insecure-example.pub.pem"))
        image = reader.manifest.image("rootfs")
        assert image is not None
        return b"".join(image_chunks(reader.iter_chunks(), image))


def build_updates(tmp_path: Path) -> tuple[dict[str, Path], bytes]:
    """The bundles of the lifecycle and the seeded data file, for the ext4 'update stick'
    (`tmp_path/stick`, made into an image by make_stick once the fleet files are there)."""
    stick = tmp_path / "stick"
    stick.mkdir()
    # 1.1.0 -> 1.2.0 recompiles six libraries (the host's x86-64 ELF files, their calls
    # moved), so the delta (stream version 2) holds bspatch operations, which the device
    # applies with bspatch (and xz for the x86 filter) from its target-tools.
    rng = random.Random(12)
    libraries = {
        f"{SAMPLE_LIBRARIES}/lib{letter}.so": path.read_bytes()
        for letter, path in zip("abcdef", host_elf_files(6), strict=True)
    }
    full_v11 = stick / "demo-1.1.0.avb"
    recipe = demo_variant(tmp_path, "1.1.0", binaries=libraries)
    avobuild_cli("bundle", "create", recipe, "-o", full_v11)
    full_v12 = tmp_path / "demo-1.2.0.avb"
    recompiled = {dest: recompile(rng, data) for dest, data in libraries.items()}
    recipe = demo_variant(tmp_path, "1.2.0", binaries=recompiled)
    avobuild_cli("bundle", "create", recipe, "-o", full_v12)
    delta = stick / "demo-1.1.0-1.2.0.delta.avb"
    avobuild_cli("delta", "create", "--from", full_v11, "--to", full_v12, "-o", delta, "--key", KEY)
    operations = delta_operations(delta)
    assert operations.startswith(b"avobuild-delta 2\n"), operations[:40]
    assert re.search(rb"\nbspatch \d+ \d+ (raw|x86) ", operations), "no bspatch in the delta"
    bad_health = stick / "demo-1.3.0.avb"
    recipe = demo_variant(
        tmp_path,
        "1.3.0",
        files={"/usr/local/bin/validate-system": FAILING_SELF_TEST},
        app_validation=True,
    )
    avobuild_cli("bundle", "create", recipe, "-o", bad_health)
    panic = stick / "demo-1.4.0.avb"
    recipe = demo_variant(tmp_path, "1.4.0", files={"/sbin/init": CRASHING_INIT})
    avobuild_cli("bundle", "create", recipe, "-o", panic)
    data = random.Random(20261127).randbytes(256 << 10)
    (stick / "keep.bin").write_bytes(data)
    bundles = {"full": full_v11, "delta": delta, "bad_health": bad_health, "panic": panic}
    return {name: Path(MEDIA) / path.name for name, path in bundles.items()}, data


class Device:
    """The guest's serial console, with a shell once the boot marker showed."""

    def __init__(self, machine: Qemu) -> None:
        self.machine = machine
        self.serial = 0

    def booted(self, slot: str, version: str, timeout: float = 300) -> bytes:
        """The boot up to the marker (the applier's boot hook prints it), then the shell."""
        line = MARKER + f" slot={slot} version={version}\r\n".encode()
        boot = self.machine.expect(line, timeout=timeout)
        self.machine.expect(b"# ", timeout=120)
        return boot

    def run(self, command: str, timeout: float = 120) -> tuple[int, str]:
        """Run a shell command; its exit status and output."""
        self.serial += 1
        # The end line is computed by the shell, so the console's echo of the command
        # line never matches it.
        end = f"END-{self.serial}-RC="
        tail = '-RC=$rc"'
        self.machine.send(f'{command}; rc=$?; echo "END-$(({self.serial} * 1)){tail}\n')
        text = self.machine.expect(end.encode(), timeout=timeout)
        code = self.machine.expect(b"\n", timeout=10)
        output = text.decode(errors="replace").rsplit(tail, 1)[-1].rsplit(end, 1)[0]
        return int(code.strip()), output

    def check(self, command: str, timeout: float = 120) -> str:
        code, output = self.run(command, timeout)
        assert code == 0, f"{command!r} failed ({code}):\n{output}"
        return output

    def mount_media(self) -> None:
        self.check(f"mkdir -p {MEDIA} && mount -t ext4 -o ro /dev/vdb {MEDIA}")

    def install(self, bundle: Path, timeout: float = 900) -> str:
        apply = f"avocado-update apply --target inactive --bundle {bundle}"
        output = self.check(apply, timeout)
        self.check("avocado-update commit")
        self.machine.send("reboot\n")
        return output


def boot_disk(disk: Path) -> list[str]:
    """The device's disk, first in the firmware's boot order (QEMU passes bootindex to OVMF:
    the variable store of a machine that booted other media lists those first)."""
    return [
        "-drive",
        f"file={disk},format=raw,if=none,id=disk",
        "-device",
        "virtio-blk-pci,drive=disk,bootindex=1",
    ]


def restore_with_usb_stick(tmp_path: Path, firmware: list[str], disk: Path, factory: Path) -> None:
    """Boot the USB recovery stick (chosen in the boot menu: bootindex 0) and restore the
    factory image onto the device's disk from its menu."""
    stick = tmp_path / "recovery.iso"
    avobuild_cli("applier", "render", DEMO, "-o", tmp_path / "applier")
    applier = tmp_path / "applier" / "usr/sbin/avocado-update"
    avobuild_cli(
        "media", "usb", DEMO, "--factory-image", factory, "--applier", applier, "-o", stick
    )
    usb = [
        "-device",
        "qemu-xhci",
        "-drive",
        f"if=none,id=stick,format=raw,readonly=on,file={stick}",
        "-device",
        "usb-storage,drive=stick,bootindex=0",
    ]
    with qemu([*firmware, *boot_disk(disk), *usb, "-net", "none"], tmp_path / "usb.log") as machine:
        boot = machine.expect(MENU, timeout=300)
        assert b"1. Restore factory image" in boot
        restore_factory_image(machine, "/dev/vda")
    for label in ("boot", "system-a", "system-b"):
        assert partition_bytes(disk, label) == partition_bytes(factory, label), label


@dataclass(frozen=True)
class Network:
    """The host side of the network stage."""

    proxy: CuttingProxy  # between the inside device and the server
    server_log: Path  # `serve --access-log`
    delta: Path  # the delta bundle the device should fetch


def lifecycle(
    machine: Qemu,
    bundles: dict[str, Path],
    data: bytes,
    repository: Path,
    network: Network,
    phase: Callable[[str], None],
) -> None:
    """Steps 1 to 4 and the network stage, on one machine."""
    device = Device(machine)
    device.booted("A", "1.0.0")
    device.mount_media()
    device.check(f"mkdir -p /data/lifecycle && cp {MEDIA}/keep.bin /data/{DATA_FILE} && sync")
    # Provisioning: the fleet certificate, key and agent configuration, on /data (they
    # outlive every update); from now on the applier records telemetry events.
    device.check(f"mkdir -p /data/avocado && cp -r {MEDIA}/fleet/inside/. /data/avocado/")
    phase("booted A 1.0.0, data file written, fleet identity provisioned")

    # 1. a full bundle into B, a trial boot, the health check confirms it
    device.install(bundles["full"])
    boot = device.booted("B", "1.1.0")
    assert b"Booting `avobuild-demo (slot B)'" in boot
    assert b"booted slot B (1.1.0), state Testing" in boot
    machine.expect(b"confirmed slot B (1.1.0)", timeout=180)
    status = device.check("avocado-update status")
    assert "Current: 1.1.0 (Partition B)" in status and "Slot B: confirmed" in status
    phase("full bundle 1.1.0 installed, B confirmed")

    # 2. a delta bundle from the running 1.1.0 into A
    device.mount_media()
    applied = device.install(bundles["delta"])
    assert "applied 1.2.0 to slot A" in applied, applied
    boot = device.booted("A", "1.2.0")
    assert b"booted slot A (1.2.0), state Testing" in boot
    machine.expect(b"confirmed slot A (1.2.0)", timeout=180)
    assert "avobuild demo 1.2.0" in device.check("cat /etc/motd")
    phase("delta bundle 1.1.0 -> 1.2.0 installed, A confirmed")

    # 3. the health check fails on 1.3.0; the device rolls back to A by itself
    device.mount_media()
    device.install(bundles["bad_health"])
    boot = device.booted("B", "1.3.0")
    assert b"booted slot B (1.3.0), state Testing" in boot
    failed = machine.expect(b"rolled back: app_validation", timeout=240)
    assert b"health check failed" in failed
    boot = device.booted("A", "1.2.0")
    assert b"Booting `avobuild-demo (slot A)'" in boot
    status = device.check("avocado-update status")
    assert "Current: 1.2.0 (Partition A)" in status, status
    assert "Slot A: confirmed" in status and "Next boot: slot A" in status
    history = device.check("avocado-update history")
    assert "app_validation" in history and "from=B" in history, history
    phase("1.3.0 failed its health check, rolled back to A")

    # 4. 1.4.0 panics the kernel on every trial boot; GRUB falls back after max_attempts
    device.mount_media()
    device.install(bundles["panic"])
    for _ in range(3):  # [rollback.boot_failure] max_attempts = 3
        machine.expect(b"Booting `avobuild-demo (slot B)'", timeout=240)
        machine.expect(b"Kernel panic - not syncing", timeout=240)
    boot = device.booted("A", "1.2.0")
    assert b"Booting `avobuild-demo (slot A)'" in boot
    assert b"Booting `avobuild-demo (slot B)'" not in boot  # no fourth trial boot
    status = device.check("avocado-update status")
    assert "Current: 1.2.0 (Partition A)" in status and "Next boot: slot A" in status
    history = device.check("avocado-update history")
    assert "boot_failure" in history and "from=B" in history, history
    report = device.check("avocado-update report --format json")
    assert '"B":{"version":"1.4.0","ok":false,"tries":0}' in report, report
    digest = device.check(f"sha256sum /data/{DATA_FILE}").split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    phase("1.4.0 panicked 3 times, fell back to A")

    network_stage(machine, device, repository, network, phase)
    machine.send("sync; poweroff -f\n")
    machine.expect(POWER_OFF, timeout=120)
    assert machine.ended.wait(timeout=60)
    assert machine.resets == 9, "a reset per reboot: 5 installs, 1 rollback, 3 panics"


def network_stage(
    machine: Qemu,
    device: Device,
    repository: Path,
    network: Network,
    phase: Callable[[str], None],
) -> None:
    """The device's agent and the host's `avobuild serve`, over user-mode networking."""
    inside, outside = fleet_ids()
    other = f"{MEDIA}/fleet/outside"
    other_check = (
        f"AVO_AGENT_CONF={other}/agent.conf AVO_TELEMETRY_YAML={other}/update-telemetry.yaml "
        "avocado-update check"
    )
    device.mount_media()
    device.check(NET_UP)
    assert "no update: rollout" in device.check(other_check), "outside the 10 % rollout"
    waits = device.check("avocado-update agent --once", 300)
    assert f"update {NETWORK_VERSION} waits for the update window" in waits, waits
    phase("network: outside the rollout not offered, outside the window the device waits")

    avobuild_cli("repo", "promote", repository, NETWORK_VERSION, "--channel", "stable")
    for _ in range(30):  # serve reloads the index when the file changes
        if f"update available: {NETWORK_VERSION}" in device.check(other_check):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"{outside} was not offered {NETWORK_VERSION} at 100 %")
    device.check("sed -i '/^UpdateWindow/d' /data/avocado/agent.conf")
    # The network is cut 96 KiB into the answer to the download (of the delta's 256 KiB).
    delta_size = network.delta.stat().st_size
    delta_sha = hashlib.sha256(network.delta.read_bytes()).hexdigest()
    network.proxy.arm(96 << 10)
    code, cut = device.run("avocado-update agent --once", 900)
    assert network.proxy.cut.is_set() and code == 1, (code, cut)
    assert "the connection ended early" in cut and "run again to resume" in cut, cut
    partial = int(device.check("cat /data/avocado-update/downloads/*.part | wc -c").split()[-1])
    assert 0 < partial < delta_size, (partial, delta_size)
    phase(f"network: cut mid-download, {partial} of the delta's {delta_size} bytes kept")

    machine.send("avocado-update agent --once\n")
    applied = machine.expect(f"applied {NETWORK_VERSION} to slot B".encode(), timeout=900)
    assert b"downloaded " + NETWORK_VERSION.encode() in applied
    # The server's access log: the next pass asked for the rest, from the partial size on.
    resumed = [
        line
        for line in network.server_log.read_text().splitlines()
        if f'"GET /bundles/{delta_sha}.avb HTTP/1.1" 206 ' in line and f'"bytes={partial}-"' in line
    ]
    assert len(resumed) == 1, network.server_log.read_text()[-3000:]
    device.booted("B", NETWORK_VERSION)
    machine.expect(f"confirmed slot B ({NETWORK_VERSION})".encode(), timeout=240)
    phase(f"network: the agent found {NETWORK_VERSION}, installed the delta, B confirmed")

    device.mount_media()
    device.check(NET_UP)
    device.check("avocado-update agent --once", 300)  # sends what the boot recorded
    device.check('[ -z "$(ls /data/avocado-update/telemetry/spool)" ]')  # everything was sent
    today = datetime.now(UTC).date().isoformat()
    report = json.loads(
        avobuild_cli(
            "fleet", "report", "--repository", repository, "--from", today, "--to", today,
            "--format", "json",
        ).stdout
    )  # fmt: skip
    row = next(r for r in report["releases"] if r["version"] == NETWORK_VERSION)
    assert row["downloaded"] == row["installed"] == row["confirmed"] == 1, row
    for timing in ("median_download", "median_apply", "median_boot"):
        assert row[timing] is not None, (timing, row)
    rows = subprocess.run(
        ["sqlite3", str(repository / "telemetry.sqlite"),
         f"SELECT type, version, delta FROM events WHERE device = '{inside}'"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert f"download|{NETWORK_VERSION}|1" in rows, rows  # the delta, not the full bundle
    downloads = subprocess.run(
        ["sqlite3", str(repository / "telemetry.sqlite"),
         f"SELECT result, bytes FROM events WHERE device = '{inside}' AND type = 'download'"
         f" AND version = '{NETWORK_VERSION}' ORDER BY time, id"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert downloads[-1] == f"ok|{delta_size - partial}", downloads  # only the rest fetched
    assert any(row.startswith("failed|") for row in downloads), downloads  # the cut, reported
    assert "rollback|1.3.0|" in rows and "rollback|1.4.0|" in rows, rows
    print(f"fleet report {NETWORK_VERSION}: " + json.dumps(row))
    phase("network: fleet report shows the device's times, confirmation and rollbacks")


def test_device_lifecycle(tmp_path: Path) -> None:
    started = time.monotonic()
    phases: list[tuple[str, float]] = []

    def phase(name: str) -> None:
        phases.append((name, time.monotonic() - started))

    out = tmp_path / "out"
    avobuild_cli("image", DEMO, "-o", out)
    factory = out / "avobuild-demo-1.0.0.img"
    bundles, data = build_updates(tmp_path)
    repository, pki = prepare_fleet(tmp_path, tmp_path / "demo-1.2.0.avb", tmp_path / "stick")
    disk = tmp_path / "disk.img"
    shutil.copyfile(factory, disk)
    phase("host: factory image, bundles and the fleet repository built")

    firmware = uefi_args(tmp_path)  # one UEFI variable store for the device's whole life
    with contextlib.ExitStack() as stack:
        server_log = tmp_path / "serve.log"
        server = stack.enter_context(running_server(repository, pki, server_log, "--access-log"))
        proxy = CuttingProxy(server.port)
        stack.callback(proxy.close)
        # An update window that is closed now (the guest's clock is the host's, in UTC).
        later = datetime.now(UTC) + timedelta(hours=2)
        window = f"{later:%H}:00-{(later + timedelta(hours=1)):%H}:00"
        provision(tmp_path / "stick", pki, (proxy.port, server.port), window)
        make_stick(tmp_path / "stick", tmp_path / "stick.img")
        args = [
            *firmware,
            *boot_disk(disk),
            "-drive",
            f"file={tmp_path / 'stick.img'},format=raw,if=none,id=stick,readonly=on",
            "-device",
            "virtio-blk-pci,drive=stick",
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0,romfile=",
        ]
        machine = stack.enter_context(qemu(args, tmp_path / "console.log", reboot=True))
        network = Network(proxy, server_log, tmp_path / "network-delta.avb")
        lifecycle(machine, bundles, data, repository, network, phase)

    # The data file, read back from the data partition on the host.
    data_image = tmp_path / "data.img"
    data_image.write_bytes(partition_bytes(disk, "data"))
    subprocess.run(["e2fsck", "-fn", str(data_image)], check=True, capture_output=True)
    assert ext4_dump(data_image, f"/{DATA_FILE}", tmp_path) == data

    # 5. a broken disk: the USB recovery stick restores the factory image
    with disk.open("r+b") as handle:
        handle.write(bytes(64 << 20))  # partition table, ESP and the start of slot A
    restore_with_usb_stick(tmp_path, firmware, disk, factory)
    phase("USB recovery restored the factory image")
    with qemu([*firmware, *boot_disk(disk), "-net", "none"], tmp_path / "restored.log") as machine:
        Device(machine).booted("A", "1.0.0")
    phase("restored disk boots A 1.0.0")

    # Durations are printed (docs/demo-device.md quotes them), not asserted: the machines
    # this runs on are shared.
    for name, at in phases:
        print(f"{at:7.1f} s  {name}")
