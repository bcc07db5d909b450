"""Rendering the applier: recipe tables, refusals, GRUB and U-Boot artefacts checked by their
own tools (grub-script-check, grub-editenv, mkenvimage, fw_printenv/fw_setenv, dumpimage)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import Product, avobuild_cli

from avobuild.applier.render import render_applier
from avobuild.applier.scripts import sh_quote
from avobuild.boot.grubenv import render_grubenv
from avobuild.boot.state import factory_state
from avobuild.boot.trial import trial_boot
from avobuild.boot.uboot import (
    parse_uboot_copy,
    read_uboot_env,
    render_redundant_pair,
    render_uboot_env,
)
from avobuild.errors import RecipeError
from avobuild.model.layout import Slot
from avobuild.model.recipe import load_recipe


def with_tables(product: Product, text: str) -> Path:
    recipe = product.recipe.with_name("applier.toml")
    recipe.write_text(product.recipe.read_text() + text)
    return recipe


def test_cli_renders_every_file(product: Product, tmp_path: Path) -> None:
    result = avobuild_cli("applier", "render", product.recipe, "-o", tmp_path / "out")
    listed = set(result.stdout.split())
    assert {
        "usr/sbin/avocado-update",
        "etc/avocado/rollback.yaml",
        "etc/init.d/S45avocado-update",
        "boot/efi/EFI/BOOT/grub.cfg",
    } <= listed
    keys = [name for name in listed if name.startswith("etc/avocado/keys/")]
    key_id = subprocess.run(
        f"openssl pkey -pubin -in {product.public_key} -outform DER | sha256sum",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    assert keys == [f"etc/avocado/keys/{key_id}.ed25519.pem"]
    script = tmp_path / "out" / "usr" / "sbin" / "avocado-update"
    subprocess.run(["busybox", "sh", "-n", str(script)], check=True)
    assert "COMPATIBLE='testprod-x86_64'" in script.read_text()
    # The same recipe renders the same bytes.
    avobuild_cli("applier", "render", product.recipe, "-o", tmp_path / "again")
    for name in listed:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_grub_cfg_passes_grub_script_check(product: Product, tmp_path: Path) -> None:
    render_applier(load_recipe(product.recipe), tmp_path)
    grub_cfg = tmp_path / "boot" / "efi" / "EFI" / "BOOT" / "grub.cfg"
    subprocess.run(["grub-script-check", str(grub_cfg)], check=True)
    text = grub_cfg.read_text()
    # Every decrement the model makes is spelled out in the script.
    for slot in "AB":
        for tries in range(1, 10):
            assert f'"${{avo_{slot}_tries}}" = "{tries}" ]; then\n' in text
            assert f"set avo_{slot}_tries={tries - 1}\n" in text
    # a panicking trial boot resets the board, so it uses up an attempt (default 10 s)
    assert " panic=10 console=ttyS0,115200\n" in text
    broken = tmp_path / "broken.cfg"
    broken.write_text(text.replace("fi\n", "", 1))
    assert subprocess.run(["grub-script-check", str(broken)], capture_output=True).returncode


@pytest.mark.parametrize(
    ("variables", "slot", "tries_after"),
    [
        ({"avo_primary": "A", "avo_A_ok": "1", "avo_A_tries": "0"}, Slot.A, "0"),
        ({"avo_primary": "B", "avo_B_ok": "0", "avo_B_tries": "3"}, Slot.B, "2"),
        ({"avo_primary": "B", "avo_B_ok": "0", "avo_B_tries": "1"}, Slot.B, "0"),
        ({"avo_primary": "B", "avo_B_ok": "0", "avo_B_tries": "0"}, Slot.A, "0"),
        ({"avo_primary": "A", "avo_A_ok": "0", "avo_A_tries": "junk"}, Slot.B, "junk"),
    ],
)
def test_trial_boot_rule(variables: dict[str, str], slot: Slot, tries_after: str) -> None:
    booted, saved = trial_boot(variables)
    assert booted is slot
    assert saved[f"avo_{variables['avo_primary']}_tries"] == tries_after


def test_target_without_required_tools_is_refused(product: Product, tmp_path: Path) -> None:
    recipe = with_tables(
        product,
        '\n[applier]\nbootloader = "u-boot"\ninit = "systemd"\n'
        'target-tools = ["busybox", "openssl", "zstd"]\n',
    )
    with pytest.raises(RecipeError) as error:
        render_applier(load_recipe(recipe), tmp_path)
    message = str(error.value)
    assert "[applier] target-tools" in message
    for tool in ("fw_printenv", "fw_setenv", "systemctl"):
        assert tool in message
    assert not (tmp_path / "usr").exists(), "nothing is rendered for a refused configuration"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("[applier]\nstate-dir = \"/data/x'; reboot; '\"\n", "state-dir"),
        ('[applier]\ndownload-url = "http://h/$(reboot)"\n', "download-url"),
        ('[applier]\nbootloader = "lilo"\n', "bootloader"),
        ('[rollback.service_health]\ncritical_services = ["a b"]\n', "critical_services"),
        ('[rollback.boot_failure]\ntimeout = "2 minutes"\n', "timeout"),
        ("[rollback.boot_failure]\nmax_attempts = 12\n", "max_attempts"),
        ("[applier]\npanic-reboot = 7200\n", "panic-reboot"),
        ('[applier]\npanic-reboot = "5s"\n', "panic-reboot"),
        ("[rollback.boot_failure]\nretries = 2\n", "retries"),
        (
            '[[rollback.system_metrics.conditions]]\nmetric = "memory_usage"\nthreshold = "85C"\n',
            "threshold",
        ),
    ],
)
def test_bad_applier_tables_name_the_key(product: Product, table: str, key: str) -> None:
    recipe = with_tables(product, "\n" + table)
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert str(recipe) in str(error.value) and key in str(error.value)


def test_sh_quote_refuses_shell_syntax() -> None:
    assert sh_quote("/data/avocado-update") == "'/data/avocado-update'"
    for bad in ("a'b", "a b", "$(x)", "`x`", "a;b", "a\nb", "a\\b"):
        with pytest.raises(RecipeError):
            sh_quote(bad)


def test_rollback_table_renders_to_rollback_yaml(product: Product, tmp_path: Path) -> None:
    recipe = with_tables(
        product,
        '\n[rollback.boot_failure]\nmax_attempts = 5\ntimeout = "3m"\n'
        '[rollback.service_health]\ncritical_services = ["avocado-core", "update-agent"]\n'
        'check_interval = "10s"\nfailure_threshold = 4\n'
        '[[rollback.system_metrics.conditions]]\nmetric = "cpu_temperature"\n'
        'threshold = "70C"\nduration = "1m"\n'
        '[rollback.app_validation]\nscript = "/opt/check"\ntimeout = "5s"\n',
    )
    render_applier(load_recipe(recipe), tmp_path)
    text = (tmp_path / "etc" / "avocado" / "rollback.yaml").read_text()
    for expected in (
        "      max_attempts: 5\n      timeout: 3m\n",
        "        - avocado-core\n        - update-agent\n      check_interval: 10s\n",
        "      failure_threshold: 4\n",
        "        - metric: cpu_temperature\n          threshold: 70C\n          duration: 1m\n",
        "      enabled: true\n      script: /opt/check\n      timeout: 5s\n",
    ):
        assert expected in text


# --- U-Boot ----------------------------------------------------------------------------------

UBOOT_VARIABLES = factory_state("1.0.0", "testprod-x86_64").to_variables()


def test_uboot_env_matches_mkenvimage(tmp_path: Path) -> None:
    text = "".join(f"{name}={value}\n" for name, value in UBOOT_VARIABLES.items())
    (tmp_path / "env.txt").write_text(text)
    for redundant in (False, True):
        output = tmp_path / f"mk-{redundant}.bin"
        flags = ["-r"] if redundant else []
        subprocess.run(
            ["mkenvimage", *flags, "-s", "16384", "-o", str(output), str(tmp_path / "env.txt")],
            check=True,
        )
        ours = render_uboot_env(UBOOT_VARIABLES, 16384, redundant=redundant)
        assert output.read_bytes() == ours
        assert parse_uboot_copy(ours, redundant=redundant).crc_ok


def test_uboot_env_round_trips_through_libubootenv(tmp_path: Path) -> None:
    env = tmp_path / "env.bin"
    env.write_bytes(render_uboot_env(UBOOT_VARIABLES, 0x4000))
    config = tmp_path / "fw_env.config"
    config.write_text(f"{env} 0x0 0x4000\n")
    printed = subprocess.run(
        ["fw_printenv", "-c", str(config)], capture_output=True, text=True, check=True
    ).stdout
    assert dict(line.split("=", 1) for line in printed.splitlines()) == UBOOT_VARIABLES
    subprocess.run(["fw_setenv", "-c", str(config), "avo_primary", "B"], check=True)
    variables = read_uboot_env(env.read_bytes())
    assert variables["avo_primary"] == "B" and variables["avo_A_version"] == "1.0.0"
    damaged = bytearray(env.read_bytes())
    damaged[10] ^= 1
    with pytest.raises(Exception, match="CRC"):
        read_uboot_env(bytes(damaged))


def test_redundant_uboot_env_follows_the_newer_copy(tmp_path: Path) -> None:
    first, second = render_redundant_pair(UBOOT_VARIABLES, 0x4000)
    env = tmp_path / "env.bin"
    env.write_bytes(first + second)
    config = tmp_path / "fw_env.config"
    config.write_text(f"{env} 0x0 0x4000\n{env} 0x4000 0x4000\n")
    subprocess.run(["fw_setenv", "-c", str(config), "avo_primary", "B"], check=True)
    data = env.read_bytes()
    copies = [
        parse_uboot_copy(data[:0x4000], redundant=True),
        parse_uboot_copy(data[0x4000:], redundant=True),
    ]
    assert all(copy.crc_ok for copy in copies)
    assert read_uboot_env(data[:0x4000], data[0x4000:])["avo_primary"] == "B"
    # The previous copy survives: a power cut during the write would have left it current.
    assert {copy.variables["avo_primary"] for copy in copies} == {"A", "B"}
    printed = subprocess.run(
        ["fw_printenv", "-c", str(config), "-n", "avo_primary"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed.strip() == "B"


def test_uboot_render_compiles_the_boot_script(product: Product, tmp_path: Path) -> None:
    recipe = with_tables(
        product,
        '\n[applier]\nbootloader = "u-boot"\n'
        'target-tools = ["busybox", "openssl", "zstd", "fw_printenv", "fw_setenv"]\n'
        "uboot-env-redundant = true\n",
    )
    render_applier(load_recipe(recipe), tmp_path)
    listing = subprocess.run(
        ["dumpimage", "-l", str(tmp_path / "boot" / "efi" / "boot.scr")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Script" in listing
    # uboot-env-redundant describes U-Boot's own environment: the script saves with saveenv
    boot_cmd = (tmp_path / "boot" / "efi" / "boot.cmd").read_text()
    assert "setenv avo_B_tries 2\n" in boot_cmd and "saveenv" in boot_cmd
    config = (tmp_path / "etc" / "fw_env.config").read_text().splitlines()
    assert config[-2:] == ["/dev/mmcblk0 0x3f8000 0x4000", "/dev/mmcblk0 0x3fc000 0x4000"]
    env = (tmp_path / "boot" / "uboot-env.bin").read_bytes()
    assert parse_uboot_copy(env, redundant=True).variables == UBOOT_VARIABLES


def test_grubenv_written_by_python_is_what_grub_editenv_reads(tmp_path: Path) -> None:
    env = tmp_path / "grubenv"
    env.write_bytes(render_grubenv(UBOOT_VARIABLES))
    listed = subprocess.run(
        ["grub-editenv", str(env), "list"], capture_output=True, text=True, check=True
    ).stdout
    assert dict(line.split("=", 1) for line in listed.splitlines()) == UBOOT_VARIABLES
