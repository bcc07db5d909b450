"""The on-target avocado-update: `help`, `--help`, `VERB --help` for every verb main.sh
dispatches, and `verify` off the device (no boot state, no disk) with the same verdicts as on
the simulated device."""

# ruff: noqa: F811  (the fixtures of test_applier_device are imported, then requested by name)

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO
from test_applier_device import (  # noqa: F401
    REFUSALS,
    Device,
    Setup,
    bad_bundles,
    device,
    setup,
)


def _verbs() -> list[str]:
    """The verbs main.sh dispatches (its case labels), help excepted."""
    main = (REPO / "avobuild" / "applier" / "shell" / "main.sh").read_text()
    labels = re.findall(r"^    ([a-z][a-z| -]*)\) ", main, re.MULTILINE)
    verbs = [verb.strip() for label in labels for verb in label.split("|")]
    return [v for v in verbs if v not in {"help", "apply-delta"} and not v.startswith("-")]


def test_help_lists_every_verb_and_each_verb_has_usage(device: Device) -> None:
    verbs = _verbs()
    assert len(verbs) >= 18 and "verify" in verbs
    listing = device.run("help").stdout
    assert device.run("--help").stdout == device.run("-h").stdout == listing
    for verb in verbs:
        assert re.search(rf"^  {re.escape(verb)} +\S", listing, re.MULTILINE), verb
        for flag in ("--help", "-h"):
            shown = device.run(verb, flag)
            assert shown.returncode == 0 and shown.stderr == ""
            assert shown.stdout.startswith(f"usage: avocado-update {verb}"), shown.stdout
        assert device.run("help", verb).stdout == device.run(verb, "--help").stdout
    assert "--bundle FILE|-" in device.run("verify", "--help").stdout
    unknown = device.run("frobnicate", check=False)
    assert unknown.returncode == 2 and "avocado-update help" in unknown.stderr
    wrong = device.run("status", "--bogus", check=False)
    assert wrong.returncode == 2 and "avocado-update status --help" in wrong.stderr


def _off_device(device: Device, tmp_path: Path) -> dict[str, str]:
    """No boot state and no disk: a build host with the rendered applier and its keys."""
    return {"AVO_GRUBENV": str(tmp_path / "no-esp" / "grubenv"), "AVO_DISK": ""}


def test_verify_off_device(
    setup: Setup, device: Device, bad_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = _off_device(device, tmp_path)
    good = device.run("verify", "--bundle", setup.bundle, **env)
    assert "verified: testprod 2.0.0" in good.stdout
    assert "verifying off the device" in good.stderr
    piped = device.run("verify", "-", stdin=setup.bundle.read_bytes(), **env)
    assert "verified: testprod 2.0.0" in piped.stdout
    for reason, (_, message, code) in sorted(REFUSALS.items()):
        refused = device.run("verify", "--bundle", bad_bundles[reason], check=False, **env)
        assert refused.returncode == code and message in refused.stderr, (reason, refused.stderr)
    assert not device.state.exists(), "verify off the device wrote a state"
    # On the device (a boot state), verify still checks the device's partition table.
    assert "verified" in device.run("verify", "--bundle", setup.bundle).stdout
    assert "off the device" not in device.run("verify", "--bundle", setup.bundle).stderr


@pytest.mark.parametrize("verb", ["validate", "simulate"])
def test_verbs_that_need_the_device_still_say_so(device: Device, setup: Setup, verb: str,
                                                 tmp_path: Path) -> None:  # fmt: skip
    result = device.run(
        verb, "--bundle", setup.bundle, check=False, **_off_device(device, tmp_path)
    )
    assert result.returncode == 1 and "boot state missing" in result.stderr
