"""Render the on-target applier for one product: script, configuration, units, boot scripts.

`render_applier(recipe, output)` writes a directory tree meant to be copied onto the device's
root filesystem (docs/applier.md lists every file). The script is linked (`scripts.py`) from
its rendered configuration (`templates/avocado-update.sh.j2`) and the static code in
`shell/`. Values reach the templates only after the recipe validated them, and the `sh`
filter single-quotes each one and refuses anything outside a quote-free character set, so
nothing in a recipe can inject shell or GRUB syntax.

The power-loss test hook (`shell/test-hooks.sh`) is linked in only with `test_hooks=True`,
which the test suite passes; a production applier never holds it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2

from avobuild import __version__
from avobuild.applier.scripts import applier_templates, library_parts, link_program, shell_source
from avobuild.applier.scripts import sh_quote as sh_quote  # re-exported: device/boot.py uses it
from avobuild.boot.state import factory_state
from avobuild.boot.uboot import render_uboot_env
from avobuild.bundle.keys import load_keyring, public_key_pem
from avobuild.bundle.manifest import MAX_MANIFEST_SIZE
from avobuild.bundle.sign import (
    MAX_BLOCK_LINES,
    MAX_CERTIFICATE_SIZE,
    MAX_CERTIFICATES,
    MAX_LINE_SIZE,
    MAX_RECIPIENTS,
    MAX_SIGNATURE_BLOCK_SIZE,
    MAX_SIGNATURES,
    signature_algorithm,
)
from avobuild.delta.stream import (
    MAX_EXTENT,
    MAX_LINE,
    MAX_PACKED_BLOCK,
    MAX_RECOMPRESS_BLOCKS,
    MAX_RECOMPRESS_LEVEL,
    MAX_WINDOW_EXTENTS,
)
from avobuild.disk.gpt import ENTRY_SIZE
from avobuild.disk.plan import plan_layout
from avobuild.disk.table import partition_uuid, write_partition_table
from avobuild.errors import RecipeError
from avobuild.model.agent import TelemetryConfig
from avobuild.model.applier import ApplierConfig, Bootloader, InitSystem
from avobuild.model.boot import UBOOT_ENV_FILE, UBOOT_SCRIPT_FILE, UbootEnv
from avobuild.model.layout import IMAGE_SLOT_CLASS, Role, Slot, TableType
from avobuild.model.recipe import Recipe
from avobuild.run import run

SCRIPT_PATH = "usr/sbin/avocado-update"
INIT_SCRIPT_PATH = "etc/init.d/S45avocado-update"
AGENT_INIT_SCRIPT_PATH = "etc/init.d/S46avocado-agent"
FW_CONFIG_PATH = "/etc/fw_env.config"
# The code of avocado-update after its configuration and the shared library, in order.
APPLIER_PARTS = (
    "state.sh",
    "bundle.sh",
    "delta.sh",
    "verbs.sh",
    "health.sh",
    "fleet.sh",
    "help.sh",
    "main.sh",
)
# What the applier keeps on the data partition: each state value and history entry is cut to
# MAX_STATE_ENTRY bytes; past MAX_HISTORY bytes the history rotates (one old file is kept).
MAX_STATE_ENTRY = 512
MAX_HISTORY = 65536


@dataclass(frozen=True)
class SlotPartition:
    image: str
    slot: str
    label: str
    number: int
    offset: int
    size: int
    partuuid: str


@dataclass(frozen=True)
class RenderedApplier:
    root: Path
    files: tuple[Path, ...]


def check_target_tools(recipe: Recipe) -> None:
    """Refuse a configuration that needs tools the target does not list."""
    config = recipe.applier
    missing = [tool for tool in config.required_tools() if tool not in config.target_tools]
    if missing:
        why = {
            "busybox": "the shell and applets the applier runs on",
            "openssl": "bundle signature checks, and the agent's HTTPS client (s_client)",
            "zstd": "bundle chunk decompression",
            "fw_printenv": "reading the U-Boot environment (bootloader = u-boot)",
            "fw_setenv": "writing the U-Boot environment (bootloader = u-boot)",
            "systemctl": "the systemd health-check and confirm units (init = systemd)",
        }
        details = "; ".join(f"{tool} ({why.get(tool, 'needed')})" for tool in missing)
        raise RecipeError(
            f"{recipe.path}: [applier] target-tools: the applier needs {details}, "
            f"which the target lacks (it lists: {', '.join(config.target_tools)})"
        )


def slot_partitions(recipe: Recipe) -> tuple[SlotPartition, ...]:
    plan = plan_layout(recipe.layout)
    found: list[SlotPartition] = []
    for image in IMAGE_SLOT_CLASS:
        for slot in Slot:
            placed = plan.slot_partition(image, slot)
            if placed is None:
                continue
            found.append(
                SlotPartition(
                    image=image,
                    slot=slot.value,
                    label=placed.spec.label,
                    number=placed.number,
                    offset=placed.offset,
                    size=placed.size,
                    partuuid=partition_uuid(plan, placed, recipe.seed),
                )
            )
    return tuple(found)


def trusted_key_files(recipe: Recipe) -> list[Path]:
    """The public keys the device trusts: `[applier] keys`, else the signing key's pair."""
    if recipe.applier.keys:
        return list(recipe.applier.keys)
    key = recipe.signing_key
    if key is not None and key.name.endswith(".key.pem"):
        public = key.with_name(key.name[: -len(".key.pem")] + ".pub.pem")
        if public.is_file():
            return [public]
    raise RecipeError(
        f"{recipe.path}: [applier] keys: missing; the device needs trusted public keys "
        "(no *.pub.pem beside the [signing] key to default to)"
    )


def render_applier(recipe: Recipe, output: Path, *, test_hooks: bool = False) -> RenderedApplier:
    """Render the applier tree for `recipe` into `output` (a root filesystem overlay).

    `test_hooks` links the power-loss hook of the test suite into the script; never for a
    device.
    """
    check_target_tools(recipe)
    config = recipe.applier
    if recipe.layout.table is TableType.MBR and config.disk is None:
        raise RecipeError(
            f"{recipe.path}: [applier] disk: missing; the partitions of an MBR layout "
            f"({recipe.layout.path}) have no names to find them by, so the applier addresses "
            'them by offset on the disk: set it, e.g. disk = "/dev/mmcblk0"'
        )
    env = applier_templates()
    parts = slot_partitions(recipe)
    system = {p.slot: p for p in parts if p.image == "rootfs"}
    boot = plan_layout(recipe.layout).by_role(Role.BOOT)
    assert boot is not None
    values = {
        "product_name": recipe.name,
        "compatible": recipe.compatible,
        "avobuild_version": __version__,
        "bootloader": config.bootloader.value,
        "init": config.init.value,
        "max_attempts": recipe.rollback.max_attempts,
        "disk": config.disk,
        "grubenv_path": config.grubenv_path,
        "fw_config_path": FW_CONFIG_PATH,
        "state_dir": config.state_dir,
        "data_mount": config.data_mount,
        "download_url": config.download_url,
        "min_free_kb": config.min_free_space // 1024,
        "min_battery": config.min_battery,
        "slot_partitions": parts,
        "system": system,
        "boot_partition": boot.number,
        "kernel_path": recipe.kernel_dest,
        "boot_console": recipe.boot.console,
        "boot_cmdline": recipe.boot.cmdline,
        "rollback": recipe.rollback,
        "config": config,
        "signature_threshold": signature_threshold(recipe),
        "limits": applier_limits(),
        "table": expected_partition_table(recipe),
    }
    hooks = shell_source("test-hooks.sh" if test_hooks else "hooks.sh")
    script = link_program(
        env.get_template("avocado-update.sh.j2").render(values),
        (*library_parts(), hooks, *(shell_source(name) for name in APPLIER_PARTS)),
    )
    files: dict[str, str] = {
        SCRIPT_PATH: script,
        "etc/avocado/rollback.yaml": env.get_template("rollback.yaml.j2").render(values),
        "etc/avocado/post-update.d/README": env.get_template("post-update.README.j2").render(
            values
        ),
    }
    if config.init is InitSystem.SYSTEMD:
        for unit in ("avocado-update-boot.service", "avocado-update-health.service"):
            files[f"usr/lib/systemd/system/{unit}"] = env.get_template(unit + ".j2").render(values)
    else:
        files[INIT_SCRIPT_PATH] = shell_source("S45avocado-update.sh")
    if recipe.fleet is not None:
        files.update(_agent_files(recipe, env, values))
    if config.bootloader is Bootloader.GRUB:
        files["boot/efi/EFI/BOOT/grub.cfg"] = env.get_template("grub.cfg.j2").render(values)
    else:
        files["etc/fw_env.config"] = env.get_template("fw_env.config.j2").render(values)
        files[uboot_path(recipe, "boot.cmd")] = env.get_template("boot.cmd.j2").render(
            values, uboot=uboot_script_values(recipe)
        )

    written: list[Path] = []
    for relative, text in files.items():
        path = output / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        mode = (
            0o755 if relative in (SCRIPT_PATH, INIT_SCRIPT_PATH, AGENT_INIT_SCRIPT_PATH) else 0o644
        )
        path.chmod(mode)
        written.append(path)
    written += write_key_files(trusted_key_files(recipe), output / "etc/avocado/keys")
    if recipe.fleet is not None:
        written += write_key_files(list(recipe.fleet.index_keys), output / "etc/avocado/index-keys")
        if recipe.fleet.server_ca is not None:
            ca = output / "etc/avocado/fleet-ca.crt"
            ca.write_bytes(recipe.fleet.server_ca.read_bytes())
            ca.chmod(0o644)
            written.append(ca)
    if config.bootloader is Bootloader.UBOOT:
        written += _write_uboot_files(recipe, config, output)
    return RenderedApplier(output, tuple(sorted(written)))


def applier_limits() -> dict[str, int]:
    """The format limits the shell reader enforces: the Python reader's own constants."""
    return {
        "manifest_size": MAX_MANIFEST_SIZE,
        "signature_block_size": MAX_SIGNATURE_BLOCK_SIZE,
        "signature_lines": MAX_BLOCK_LINES,
        "signature_line": MAX_LINE_SIZE,
        "signatures": MAX_SIGNATURES,
        "recipients": MAX_RECIPIENTS,
        "certificates": MAX_CERTIFICATES,
        "certificate_size": MAX_CERTIFICATE_SIZE,
        "delta_line": MAX_LINE,
        "delta_extent": MAX_EXTENT,
        "window_extents": MAX_WINDOW_EXTENTS,
        "packed_block": MAX_PACKED_BLOCK,
        "recompress_blocks": MAX_RECOMPRESS_BLOCKS,
        "recompress_level": MAX_RECOMPRESS_LEVEL,
        "state_entry": MAX_STATE_ENTRY,
        "history_size": MAX_HISTORY,
    }


@dataclass(frozen=True)
class ExpectedTable:
    """What the applier checks the disk against before its first write (docs/applier.md).

    `checks`: "OFFSET:HEX:WHAT" per byte range of the table a factory image of the recipe
    holds, comma-separated (GPT: the protective MBR's type byte and boot signature, the
    header's signature, revision and size, its entry array's place, and every partition's
    entry; MBR: the disk signature and records of sector 0 and of every EBR). Nothing that
    depends on the size of the disk is compared, so a disk larger than the image passes.
    `partitions`: "LABEL:OFFSET:SIZE" per partition; `end`: where the last one ends.
    """

    table: str
    checks: str
    partitions: str
    end: int


def expected_partition_table(recipe: Recipe) -> ExpectedTable:
    """The partition table a factory image of `recipe` holds, written by the factory's own
    writer (disk/table.py) into a sparse scratch file and read back."""
    plan = plan_layout(recipe.layout)
    sector = plan.layout.sector_size
    if plan.layout.table is TableType.GPT:
        areas = [(450, 1, "protective-MBR"), (510, 2, "boot-signature")]
        areas += [(sector, 16, "GPT-header"), (sector + 72, 16, "GPT-entry-array")]
        areas += [
            (2 * sector + (part.number - 1) * ENTRY_SIZE, ENTRY_SIZE, f"GPT-entry-{part.number}")
            for part in plan.partitions
        ]
    else:
        areas = [(440, 72, "MBR")]
        areas += [
            (part.ebr_lba * sector + 446, 66, f"EBR-{part.number}")
            for part in plan.partitions
            if part.ebr_lba is not None
        ]
    with tempfile.TemporaryFile() as scratch:
        scratch.truncate(plan.disk_size)
        write_partition_table(scratch, plan, recipe.seed)
        checks = []
        for offset, size, what in areas:
            scratch.seek(offset)
            checks.append(f"{offset}:{scratch.read(size).hex()}:{what}")
    labels = [f"{part.spec.label}:{part.offset}:{part.size}" for part in plan.partitions]
    end = max(part.offset + part.size for part in plan.partitions)
    return ExpectedTable(plan.layout.table.value, ",".join(checks), ",".join(labels), end)


def signature_threshold(recipe: Recipe) -> int:
    """Distinct trusted signers a bundle needs: the largest threshold of the keyrings."""
    return max(load_keyring(source).threshold for source in trusted_key_files(recipe))


def _agent_files(
    recipe: Recipe, env: jinja2.Environment, values: Mapping[str, object]
) -> dict[str, str]:
    """agent.conf, update-telemetry.yaml and the agent's init script or unit ([fleet])."""
    fleet = recipe.fleet
    assert fleet is not None
    telemetry = recipe.telemetry or TelemetryConfig(enabled=False)
    threshold = max(load_keyring(source).threshold for source in fleet.index_keys)
    agent = {**values, "fleet": fleet, "telemetry": telemetry, "index_threshold": threshold}
    files = {
        "etc/avocado/agent.conf": env.get_template("agent.conf.j2").render(agent),
        "etc/avocado/update-telemetry.yaml": env.get_template("update-telemetry.yaml.j2").render(
            agent
        ),
    }
    if recipe.applier.init is InitSystem.SYSTEMD:
        unit = "avocado-agent.service"
        files[f"usr/lib/systemd/system/{unit}"] = env.get_template(unit + ".j2").render(agent)
    else:
        files[AGENT_INIT_SCRIPT_PATH] = shell_source("S46avocado-agent.sh")
    return files


def write_key_files(sources: list[Path], directory: Path) -> list[Path]:
    """Each trusted key as KEY-ID.ALGORITHM.pem, the name the script looks a signer up by."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sources:
        keyring = load_keyring(source)
        if keyring.anchors:
            raise RecipeError(
                f"{source}: certificates (trust anchors) are not supported by the on-target "
                "applier yet; list the signers' public keys in [applier] keys"
            )
        for key in keyring.keys:
            algorithm = signature_algorithm(key.public_key).value
            path = directory / f"{key.key_id}.{algorithm}.pem"
            path.write_bytes(public_key_pem(key.public_key))
            path.chmod(0o644)
            written.append(path)
    return written


# The U-Boot state variables, as the boot script imports and exports them: 11 names, so
# `env export -cs SIZE ADDR` + names is exactly U-Boot's default limit of 16 arguments.
UBOOT_STATE_NAMES = (
    "avo_primary",
    "avo_A_ok",
    "avo_A_tries",
    "avo_B_ok",
    "avo_B_tries",
    "avo_A_version",
    "avo_B_version",
    "avo_compatible",
    "avo_security_version",
    "avo_A_security_version",
    "avo_B_security_version",
)
# U-Boot's image architecture names (mkimage -A) and how it boots each kernel format.
_UBOOT_ARCH = {
    "aarch64": ("arm64", "booti"),
    "arm": ("arm", "bootz"),
    "riscv64": ("riscv", "booti"),
}
INITRD_PATH = "/boot/initrd.img"


@dataclass(frozen=True)
class UbootBootFiles:
    script: Path  # the compiled boot script (boot.scr)
    environment: Path  # the factory environment image


def uboot_path(recipe: Recipe, name: str) -> str:
    """Where a boot partition file of the U-Boot integration goes in the rendered tree: under
    the mount point of the boot partition (a native environment image under /boot)."""
    if name == "uboot-env.bin" and recipe.boot.uboot_env is UbootEnv.FILE:
        name = UBOOT_ENV_FILE
    elif name == "uboot-env.bin":
        return "boot/uboot-env.bin"
    return f"{recipe.applier.esp_mount.strip('/')}/{name}"


def uboot_script_values(recipe: Recipe) -> dict[str, object]:
    """What boot.cmd.j2 needs beyond the common values (docs/applier.md, U-Boot)."""
    boot = recipe.boot
    _arch, command = _UBOOT_ARCH.get(recipe.architecture.value, ("arm64", "booti"))
    return {
        "script_file": UBOOT_SCRIPT_FILE,
        "env_file": UBOOT_ENV_FILE if boot.uboot_env is UbootEnv.FILE else "",
        "env_size": recipe.applier.uboot_env_size,
        "names": " ".join(UBOOT_STATE_NAMES),
        "console": boot.console,
        "cmdline": boot.cmdline,
        "device_tree": boot.device_tree,
        "initrd_path": INITRD_PATH,
        "boot_command": command,
    }


def uboot_boot_files(recipe: Recipe, output: Path) -> UbootBootFiles:
    """Render the applier into `output` and return its U-Boot boot partition files."""
    render_applier(recipe, output)
    return UbootBootFiles(
        output / uboot_path(recipe, "boot.scr"), output / uboot_path(recipe, "uboot-env.bin")
    )


def _write_uboot_files(recipe: Recipe, config: ApplierConfig, output: Path) -> list[Path]:
    """The boot script image (mkimage -T script) and a factory environment image."""
    script = output / uboot_path(recipe, "boot.scr")
    run(
        [
            "mkimage",
            "-A",
            _UBOOT_ARCH.get(recipe.architecture.value, ("arm", "bootz"))[0],
            "-O",
            "linux",
            "-T",
            "script",
            "-C",
            "none",
            "-n",
            f"avobuild {recipe.name} A/B boot",
            "-d",
            output / uboot_path(recipe, "boot.cmd"),
            script,
        ],
        env={"SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "0")},
    )
    state = factory_state(recipe.version, recipe.compatible)
    env_image = output / uboot_path(recipe, "uboot-env.bin")
    env_image.parent.mkdir(parents=True, exist_ok=True)
    env_image.write_bytes(
        render_uboot_env(
            state.to_variables(), config.uboot_env_size, redundant=config.uboot_env_redundant
        )
    )
    return [script, env_image]
