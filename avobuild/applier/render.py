"""Render the on-target applier for one product: script, configuration, units, boot scripts.

`render_applier(recipe, output)` writes a directory tree meant to be copied onto the device's
root filesystem (docs/applier.md lists every file). Values reach the templates only after the
recipe validated them, and the `sh` filter single-quotes each one and refuses anything outside
a quote-free character set, so nothing in a recipe can inject shell or GRUB syntax.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from avobuild import __version__
from avobuild.boot.state import factory_state
from avobuild.boot.uboot import render_uboot_env
from avobuild.bundle.keys import load_keyring, public_key_pem
from avobuild.bundle.sign import signature_algorithm
from avobuild.disk.gpt import derive_guid
from avobuild.disk.plan import plan_layout
from avobuild.errors import RecipeError
from avobuild.model.applier import ApplierConfig, Bootloader, InitSystem
from avobuild.model.layout import IMAGE_SLOT_CLASS, Role, Slot
from avobuild.model.recipe import Recipe
from avobuild.run import run

_SH_SAFE = re.compile(r"[A-Za-z0-9._+~:@/,{}?=&%-]*")
SCRIPT_PATH = "usr/sbin/avocado-update"
FW_CONFIG_PATH = "/etc/fw_env.config"


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


def sh_quote(value: object) -> str:
    """A single-quoted shell word; refuses characters that would need more than quotes."""
    text = "" if value is None else str(value)
    if not _SH_SAFE.fullmatch(text):
        raise RecipeError(f"applier: value {text!r} contains characters unsafe for the script")
    return f"'{text}'"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("avobuild.applier", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters["sh"] = sh_quote
    return env


def check_target_tools(recipe: Recipe) -> None:
    """Refuse a configuration that needs tools the target does not list."""
    config = recipe.applier
    missing = [tool for tool in config.required_tools() if tool not in config.target_tools]
    if missing:
        why = {
            "busybox": "the shell and applets the applier runs on",
            "openssl": "bundle signature checks",
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
                    partuuid=str(derive_guid(recipe.seed, "partition", placed.spec.label)),
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


def render_applier(recipe: Recipe, output: Path) -> RenderedApplier:
    """Render the applier tree for `recipe` into `output` (a root filesystem overlay)."""
    check_target_tools(recipe)
    config = recipe.applier
    env = _environment()
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
        "rollback": recipe.rollback,
        "config": config,
        "signature_threshold": signature_threshold(recipe),
    }
    files: dict[str, str] = {
        SCRIPT_PATH: env.get_template("avocado-update.sh.j2").render(values),
        "etc/avocado/rollback.yaml": env.get_template("rollback.yaml.j2").render(values),
        "etc/avocado/post-update.d/README": env.get_template("post-update.README.j2").render(
            values
        ),
    }
    if config.init is InitSystem.SYSTEMD:
        for unit in ("avocado-update-boot.service", "avocado-update-health.service"):
            files[f"usr/lib/systemd/system/{unit}"] = env.get_template(unit + ".j2").render(values)
    else:
        files["etc/init.d/S45avocado-update"] = env.get_template("init.sh.j2").render(values)
    if config.bootloader is Bootloader.GRUB:
        files["boot/efi/EFI/BOOT/grub.cfg"] = env.get_template("grub.cfg.j2").render(values)
    else:
        files["etc/fw_env.config"] = env.get_template("fw_env.config.j2").render(values)
        files["boot/boot.cmd"] = env.get_template("boot.cmd.j2").render(values)

    written: list[Path] = []
    for relative, text in files.items():
        path = output / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        mode = 0o755 if relative in (SCRIPT_PATH, "etc/init.d/S45avocado-update") else 0o644
        path.chmod(mode)
        written.append(path)
    written += _write_keys(recipe, output / "etc/avocado/keys")
    if config.bootloader is Bootloader.UBOOT:
        written += _write_uboot_files(recipe, config, output)
    return RenderedApplier(output, tuple(sorted(written)))


def signature_threshold(recipe: Recipe) -> int:
    """Distinct trusted signers a bundle needs: the largest threshold of the keyrings."""
    return max(load_keyring(source).threshold for source in trusted_key_files(recipe))


def _write_keys(recipe: Recipe, directory: Path) -> list[Path]:
    """Each trusted key as KEY-ID.ALGORITHM.pem, the name the script looks a signer up by."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for source in trusted_key_files(recipe):
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


def _write_uboot_files(recipe: Recipe, config: ApplierConfig, output: Path) -> list[Path]:
    """The boot script image (mkimage -T script) and a factory environment image."""
    script = output / "boot" / "boot.scr"
    run(
        [
            "mkimage",
            "-A",
            "arm64" if recipe.architecture.value == "aarch64" else "arm",
            "-O",
            "linux",
            "-T",
            "script",
            "-C",
            "none",
            "-n",
            f"avobuild {recipe.name} A/B boot",
            "-d",
            output / "boot" / "boot.cmd",
            script,
        ],
        env={"SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "0")},
    )
    state = factory_state(recipe.version, recipe.compatible)
    env_image = output / "boot" / "uboot-env.bin"
    env_image.write_bytes(
        render_uboot_env(
            state.to_variables(), config.uboot_env_size, redundant=config.uboot_env_redundant
        )
    )
    return [script, env_image]
