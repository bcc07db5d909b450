"""PXE network recovery: a TFTP tree that boots the recovery system over the network.

Layout of the tree (the TFTP server's root):

    pxelinux.0, ldlinux.c32            BIOS clients (DHCP boot file "pxelinux.0")
    pxelinux.cfg/default               PXELINUX configuration
    pxelinux.cfg/01-aa-bb-cc-dd-ee-ff  per-device configuration (PXELINUX looks it up by MAC)
    bootx64.efi                        UEFI clients (DHCP boot file "bootx64.efi"): GRUB with
                                       efinet/tftp built in, prefix (tftp)/grub
    grub/grub.cfg                      its configuration
    grub/grub.cfg-01-aa-bb-cc-dd-ee-ff per-device configuration (GRUB looks it up by MAC)
    boot.ipxe                          iPXE clients; avobuild/mac-aa-bb-cc-dd-ee-ff.ipxe per device
    avobuild/vmlinuz, avobuild/initrd.img
    network-recovery.conf              the configuration inside the initrd, for reference
    http/factory.img.gz{,.sha256}      (with a factory image) what to publish at [Server] URL

The initrd is the recovery initramfs in net mode: it carries the network tool set and
/etc/avocado/network-recovery.conf, brings the interface up with DHCP and downloads images
from the recovery server, authenticating with the device certificate. A per-device entry
can start an action at once (`avo.autorun=`), e.g. a remote factory restore.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from avobuild.boot.bootfiles import (
    GRUB_COMMON_MODULES,
    GRUB_NET_MODULES,
    LDLINUX_C32,
    PXELINUX_0,
    build_grub_efi,
    copy_host_file,
)
from avobuild.errors import BuildError
from avobuild.media.recovery import (
    INITRD_NAME,
    KERNEL_NAME,
    Mode,
    RecoverySystem,
    build_initramfs,
    kernel_cmdline,
    render_template,
)
from avobuild.media.usb import FACTORY_NAME, boot_parameters, compress_factory_image
from avobuild.model.recipe import Recipe, ToolSet
from avobuild.run import source_date_epoch

Progress = Callable[[str], None]
_MAC = re.compile(r"[0-9a-f]{2}([:-][0-9a-f]{2}){5}")
_INTERFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
CONF_PATH = "etc/avocado/network-recovery.conf"


class Action(enum.StrEnum):
    """What a per-device entry starts right after boot (menu: nothing, show the menu)."""

    MENU = "menu"
    RESTORE = "restore"
    REPAIR = "repair"
    DIAGNOSE = "diagnose"


@dataclass(frozen=True)
class DeviceEntry:
    mac: str  # lower case, colon separated
    action: Action

    @property
    def pxe_name(self) -> str:
        """The "01-aa-bb-..." name PXELINUX and GRUB look up (01 = Ethernet)."""
        return "01-" + self.mac.replace(":", "-")


@dataclass(frozen=True)
class NetworkSettings:
    server: str
    url: str
    interface: str = "eth0"
    dhcp: bool = True
    timeout: int = 30
    ca_path: str = "/etc/ssl/recovery.crt"
    device_cert_path: str = "/etc/ssl/device.crt"
    device_key_path: str = "/etc/ssl/device.key"


@dataclass(frozen=True)
class PxeTree:
    root: Path
    system: RecoverySystem
    files: tuple[str, ...]


def parse_server(text: str) -> str:
    """The recovery server as a normalised IP address; `BuildError` for anything else."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise BuildError(f"--server: expected an IPv4 or IPv6 address, got {text!r}") from None


def parse_device(text: str) -> DeviceEntry:
    """ "aa:bb:cc:dd:ee:ff" or "aa:bb:cc:dd:ee:ff=restore" -> DeviceEntry."""
    mac, _, action = text.strip().lower().partition("=")
    if not _MAC.fullmatch(mac):
        raise BuildError(f"--mac: expected a MAC address like 52:54:00:12:34:56, got {text!r}")
    known = [item.value for item in Action]
    if action and action not in known:
        raise BuildError(f"--mac {text}: expected an action among {', '.join(known)}")
    return DeviceEntry(mac.replace("-", ":"), Action(action or "menu"))


def default_settings(recipe: Recipe, server: str) -> NetworkSettings:
    host = f"[{server}]" if ":" in server else server
    return NetworkSettings(server=server, url=f"https://{host}/recovery/{recipe.name}")


def render_network_conf(recipe: Recipe, settings: NetworkSettings) -> str:
    if not _INTERFACE.fullmatch(settings.interface):
        raise BuildError(f"--interface: not a network interface name: {settings.interface!r}")
    if not re.fullmatch(r"https?://[^\s]+", settings.url):
        raise BuildError(f"--url: expected an http:// or https:// URL, got {settings.url!r}")
    return render_template(
        "network-recovery.conf",
        product=recipe.name,
        url=settings.url,
        ca_path=settings.ca_path,
        interface=settings.interface,
        dhcp=settings.dhcp,
        timeout=settings.timeout,
        device_cert_path=settings.device_cert_path,
        device_key_path=settings.device_key_path,
    )


def build_pxe_tree(
    recipe: Recipe,
    output: Path,
    settings: NetworkSettings,
    *,
    devices: Sequence[DeviceEntry] = (),
    tools: Sequence[ToolSet] | None = None,
    ca_certificate: Path | None = None,
    factory_image: Path | None = None,
    applier: Path | None = None,
    progress: Progress | None = None,
) -> PxeTree:
    """Write the TFTP tree into `output` (created; must be empty or absent)."""
    server = parse_server(settings.server)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise BuildError(f"{output}: not empty; give a new directory for the TFTP tree")
    output.mkdir(parents=True, exist_ok=True)
    conf = render_network_conf(recipe, settings)
    extra = {CONF_PATH: conf.encode()}
    if ca_certificate is not None:
        extra[settings.ca_path.lstrip("/")] = ca_certificate.read_bytes()
    (output / "avobuild").mkdir()
    system = build_initramfs(
        recipe,
        output / "avobuild" / INITRD_NAME,
        mode=Mode.NET,
        tools=tools,
        applier=applier,
        extra_files=extra,
        progress=progress,
    )
    shutil.copyfile(system.kernel, output / "avobuild" / KERNEL_NAME)
    (output / "network-recovery.conf").write_text(conf)

    base = {"product": recipe.name, "version": recipe.version, "server": server}
    base.update({key: str(value) for key, value in boot_parameters(recipe).items()})

    def cmdline(entry: DeviceEntry | None) -> str:
        extra_args = []
        if entry is not None and entry.action is not Action.MENU:
            extra_args.append(f"avo.autorun={entry.action.value}")
        return kernel_cmdline(recipe, Mode.NET, extra_args)

    copy_host_file(PXELINUX_0, output / "pxelinux.0", "boot BIOS machines over the network")
    copy_host_file(LDLINUX_C32, output / "ldlinux.c32", "boot BIOS machines over the network")
    (output / "pxelinux.cfg").mkdir()
    (output / "grub").mkdir()
    (output / "pxelinux.cfg" / "default").write_text(
        render_template("pxelinux.cfg", cmdline=cmdline(None), **base)
    )
    (output / "grub" / "grub.cfg").write_text(
        render_template("pxe-grub.cfg", cmdline=cmdline(None), **base)
    )
    (output / "boot.ipxe").write_text(render_template("boot.ipxe", cmdline=cmdline(None), **base))
    for entry in sorted(set(devices), key=lambda item: item.mac):
        line = cmdline(entry)
        (output / "pxelinux.cfg" / entry.pxe_name).write_text(
            render_template("pxelinux.cfg", cmdline=line, **base)
        )
        (output / "grub" / f"grub.cfg-{entry.pxe_name}").write_text(
            render_template("pxe-grub.cfg", cmdline=line, **base)
        )
        (output / "avobuild" / f"mac-{entry.mac.replace(':', '-')}.ipxe").write_text(
            render_template("mac.ipxe", cmdline=line, mac=entry.mac, **base)
        )
    if progress:
        progress("building the GRUB EFI network boot image")
    build_grub_efi(
        output / "bootx64.efi",
        "set root=(tftp)\n",
        "(tftp)/grub",
        GRUB_COMMON_MODULES + GRUB_NET_MODULES,
    )
    if factory_image is not None:
        (output / "http").mkdir()
        digest = compress_factory_image(factory_image, output / "http" / FACTORY_NAME)
        (output / "http" / f"{FACTORY_NAME}.sha256").write_text(f"{digest}  factory.img\n")
    files = []
    epoch = source_date_epoch()
    for path in sorted(output.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
        if path.is_file():
            files.append(path.relative_to(output).as_posix())
    for path in sorted(output.rglob("*"), reverse=True):
        os.utime(path, (epoch, epoch))
    return PxeTree(output, system, tuple(files))
