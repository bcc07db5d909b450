"""The signed repository index: its grammar, its signatures, and its two readers.

Oracles: the documented example text (docs/repository-format.md 3.4) rendered again; the
documented busybox reader (section 7), which must give the same verdict as avobuild's
reference reader on every valid and hostile index and the same offer for every device;
`sha256sum` recomputing rollout buckets; hand-computed windows across a DST change.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import REPO

from avobuild.bundle.keys import KeyAlgorithm, generate_keypair, load_keyring
from avobuild.fleet.errors import IndexRefused
from avobuild.fleet.index import (
    Index,
    IndexDelta,
    IndexRelease,
    Rollout,
    frame_index,
    parse_index_body,
    read_signed_index,
    render_index,
)
from avobuild.fleet.rollout import Reason, bucket, choose_offer
from avobuild.fleet.signing import SigningPlan, open_index_signers, sign_index_body
from avobuild.fleet.windows import parse_window

DOC = REPO / "docs" / "repository-format.md"
NOW = int(time.time())
SHA = [f"{n:x}" * 64 for n in range(1, 16)]


def documented(marker: str, fence: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```{fence}\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match is not None, f"docs/repository-format.md lost its {marker} block"
    return match.group(1)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("index-keys")
    return {
        "ed": generate_keypair(root, "ed"),
        "p256": generate_keypair(root, "p256", algorithm=KeyAlgorithm.ECDSA_P256),
        "foreign": generate_keypair(root, "foreign"),
    }


@pytest.fixture(scope="module")
def busybox_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH with busybox applets and openssl only."""
    directory = tmp_path_factory.mktemp("busybox-bin")
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox (Debian package busybox-static) is needed"
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        (directory / applet).symlink_to(busybox)
    openssl = shutil.which("openssl")
    assert openssl is not None
    (directory / "openssl").unlink(missing_ok=True)
    (directory / "openssl").symlink_to(openssl)
    return str(directory)


def sign(body: bytes, *key_files: Path) -> bytes:
    with open_index_signers(SigningPlan(keys=key_files)) as signers:
        return frame_index(body, sign_index_body(body, signers))


def shell_keys(directory: Path, *public_keys: Path) -> Path:
    """Trusted keys laid out as the applier keeps them: KEY-ID.ALGORITHM.pem."""
    from avobuild.bundle.keys import load_public_key
    from avobuild.bundle.sign import signature_algorithm
    from avobuild.fleet.signing import load_index_keyring

    directory.mkdir(exist_ok=True)
    for public in public_keys:
        key_id = load_index_keyring(public).keys[0].key_id
        algorithm = signature_algorithm(load_public_key(public))
        shutil.copyfile(public, directory / f"{key_id}.{algorithm}.pem")
    return directory


class ShellReader:
    def __init__(self, root: Path, busybox: str, trusted: list[Path], threshold: int = 1):
        self.script = root / "verify-index.sh"
        self.script.write_text(documented("index-verify-example", "sh"))
        self.keys = shell_keys(root / "keys", *trusted)
        self.state = root / "state"
        self.state.mkdir(exist_ok=True)
        self.busybox = busybox
        self.threshold = threshold

    def run(
        self,
        data: bytes,
        device: str = "dev-1",
        compatible: str = "acme-imx8-evk",
        running: str = "0.9",
        channel: str = "stable",
        repository: str = "acme",
    ) -> tuple[bool, str]:
        result = subprocess.run(
            [
                f"{self.busybox}/sh",
                self.script,
                self.keys,
                str(self.threshold),
                repository,
                self.state,
                device,
                compatible,
                running,
                channel,
            ],
            input=data,
            capture_output=True,
            env={"PATH": self.busybox},
            check=False,
        )
        return result.returncode == 0, (result.stdout + result.stderr).decode()


def example_index(serial: int = 12, issued: int = NOW - 60) -> Index:
    return Index(
        repository="acme",
        serial=serial,
        issued=issued,
        expires=issued + 7 * 86400,
        releases=(
            IndexRelease("acme-imx8-*", "1.0.0", 0, 201326592, SHA[0]),
            IndexRelease("acme-imx8-*", "1.1.0", 1, 201457664, SHA[1]),
            IndexRelease("acme-x86-*", "1.1.0", 0, 180000000, SHA[2]),
        ),
        deltas=(IndexDelta("acme-imx8-*", "1.0.0", "1.1.0", 18874368, SHA[3]),),
        rollouts=(
            Rollout("beta", "1.1.0", 10000),
            Rollout("stable", "1.1.0", 2500),
            Rollout("stable", "1.0.0", 10000),
        ),
    )


def test_documented_example_is_what_avobuild_renders() -> None:
    text = documented("index-example", "")
    lines = text.splitlines()
    releases = tuple(
        IndexRelease(f[1], f[2], int(f[3]), int(f[4]), f[5])
        for f in (line.split() for line in lines if line.startswith("release "))
    )
    index = Index(
        "acme",
        12,
        1767225600,
        1767830400,
        releases,
        (IndexDelta("acme-imx8-*", "1.0.0", "1.1.0", 18874368, lines[7].split()[-1]),),
        (
            Rollout("beta", "1.1.0", 10000),
            Rollout("stable", "1.1.0", 2500),
            Rollout("stable", "1.0.0", 10000),
        ),
    )
    assert render_index(index).decode() == text
    assert parse_index_body(text.encode()) == index


def _replace(old: str, new: str) -> Callable[[str], str]:
    def change(body: str) -> str:
        assert old in body, old
        return body.replace(old, new, 1)

    return change


def _swap(first: str, second: str) -> Callable[[str], str]:
    def change(body: str) -> str:
        lines = body.split("\n")
        a = next(i for i, line in enumerate(lines) if line.startswith(first))
        b = next(i for i, line in enumerate(lines) if line.startswith(second))
        lines[a], lines[b] = lines[b], lines[a]
        return "\n".join(lines)

    return change


def _expires_at_issued(body: str) -> str:
    issued = re.search(r"\nissued ([0-9]+)", body)
    assert issued is not None
    return re.sub(r"\nexpires [0-9]+", f"\nexpires {issued.group(1)}", body)


BETA = "rollout beta 1.1.0 10000\n"
# Each breaks one rule of docs/repository-format.md section 3 in a valid body.
MUTATIONS: list[tuple[str, Callable[[str], str]]] = [
    ("leading zero", _replace("\nserial 12\n", "\nserial 012\n")),
    ("serial 0", _replace("\nserial 12\n", "\nserial 0\n")),
    ("19 digits", _replace(" 201326592 ", " 1000000000000000000 ")),
    ("unknown line", _replace("\nrollout beta", "\nmirror https://example.com\nrollout beta")),
    ("version 2", _replace("avobuild-index 1\n", "avobuild-index 2\n")),
    ("tab", _replace("\nserial 12\n", "\nserial\t12\n")),
    ("trailing space", _replace("\nserial 12\n", "\nserial 12 \n")),
    ("two spaces", _replace("\nserial 12\n", "\nserial  12\n")),
    ("CR", _replace("\nserial 12\n", "\nserial 12\r\n")),
    ("empty line", _replace("\nserial 12\n", "\nserial 12\n\n")),
    ("non-ASCII", _replace("repository acme", "repository acmé")),
    ("over 100 %", _replace("rollout beta 1.1.0 10000", "rollout beta 1.1.0 10001")),
    ("rollout of no release", _replace("rollout beta 1.1.0", "rollout beta 2.0.0")),
    ("delta to no release", _replace("acme-imx8-* 1.0.0 1.1.0", "acme-imx8-* 1.0.0 1.2.0")),
    ("delta to itself", _replace("acme-imx8-* 1.0.0 1.1.0", "acme-imx8-* 1.1.0 1.1.0")),
    ("channels out of order", lambda body: body.replace(BETA, "") + BETA),
    (
        "version twice in a channel",
        _replace(
            "rollout stable 1.0.0 10000\n", "rollout stable 1.0.0 10000\nrollout stable 1.1.0 5\n"
        ),
    ),
    (
        "rollout before delta",
        _replace("delta acme-imx8-*", "rollout beta 1.1.0 1\ndelta acme-imx8-*"),
    ),
    ("expires at issued", _expires_at_issued),
    ("no final newline", lambda body: body[:-1]),
    ("releases unsorted", _swap("release acme-imx8-* 1.0.0", "release acme-imx8-* 1.1.0")),
    (
        "release twice",
        _replace(
            "release acme-x86-*",
            f"release acme-imx8-* 1.1.0 1 201457664 {SHA[1]}\nrelease acme-x86-*",
        ),
    ),
    ("one file twice", _replace(SHA[2], SHA[1])),
]


def test_every_rule_is_enforced_by_both_readers(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]], busybox_path: str
) -> None:
    """A signed body that breaks one rule is refused by the reference reader and by the
    documented busybox reader alike (the signature is valid: only the body rules decide)."""
    private, public = keys["ed"]
    body = render_index(example_index()).decode()
    shell = ShellReader(tmp_path, busybox_path, [public])
    keyring = load_keyring(public)
    accepted, output = shell.run(sign(body.encode(), private))
    assert accepted, output
    read_signed_index(sign(body.encode(), private), keyring, now=NOW)
    for what, change in MUTATIONS:
        text = change(body)
        assert text != body, what
        data = sign(text.encode(), private)
        with pytest.raises(IndexRefused):
            read_signed_index(data, keyring, now=NOW)
        accepted, output = shell.run(data)
        assert not accepted, f"{what}: the busybox reader accepted it:\n{output}"
        assert "refused" in output, (what, output)


def test_framing_signatures_rollback_and_expiry(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]], busybox_path: str
) -> None:
    ed_private, ed_public = keys["ed"]
    p256_private, p256_public = keys["p256"]
    foreign_private, _ = keys["foreign"]
    body = render_index(example_index(serial=12))
    good = sign(body, ed_private, p256_private)
    threshold_ring = tmp_path / "ring.toml"
    threshold_ring.write_text(f'threshold = 2\nkeys = ["{ed_public}", "{p256_public}"]\n')
    ring = load_keyring(threshold_ring)
    assert read_signed_index(good, ring, now=NOW).index.serial == 12
    flipped = bytearray(good)
    flipped[40] ^= 0x01
    stale = example_index(serial=13, issued=NOW - 8 * 86400)
    cases: dict[str, bytes] = {
        "truncated": good[:-1],
        "trailing byte": good + b"\n",
        "bad magic": b"AVOINDEY" + good[8:],
        "format 2": good[:9] + b"2" + good[10:],
        "body size over 1 MiB": good[:11] + b"0001048577" + good[21:],
        "a body byte changed": bytes(flipped),
        "signed by a foreign key only": sign(body, foreign_private),
        "one of two signatures": sign(body, ed_private),
        "expired": sign(render_index(stale), ed_private, p256_private),
    }
    shell = ShellReader(tmp_path, busybox_path, [ed_public, p256_public], threshold=2)
    for what, data in cases.items():
        with pytest.raises(IndexRefused):
            read_signed_index(data, ring, now=NOW)
        accepted, output = shell.run(data)
        assert not accepted, f"{what}: accepted by the busybox reader:\n{output}"
    # Rollback: the shell reader remembers serial 12; 11 is refused by both, 12 again is not.
    assert shell.run(good)[0]
    older = sign(render_index(example_index(serial=11)), ed_private, p256_private)
    accepted, output = shell.run(older)
    assert not accepted and "rollback" in output
    with pytest.raises(IndexRefused, match="older than serial 12"):
        read_signed_index(older, ring, now=NOW, last_serial=12)
    assert shell.run(good)[0]
    with pytest.raises(IndexRefused, match="repository 'acme', expected 'other'"):
        read_signed_index(good, ring, now=NOW, repository="other")
    assert not shell.run(good, repository="other")[0]


def python_offer(index: Index, device: str, compatible: str, running: str, channel: str) -> str:
    offer = choose_offer(index, device, compatible, running, channel)
    if offer.release is None:
        assert offer.reason is not None
        return f"none {offer.reason}"
    line = f"update {offer.release.version} {offer.release.size} {offer.release.sha256}"
    if offer.delta is not None:
        line += f"\ndelta {running} {offer.delta.size} {offer.delta.sha256}"
    return line


def test_static_devices_and_the_server_reach_the_same_offer(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]], busybox_path: str
) -> None:
    """The documented busybox reader and rollout.choose_offer agree for seeded devices."""
    private, public = keys["ed"]
    index = Index(
        "acme",
        3,
        NOW - 60,
        NOW + 3600,
        releases=(
            IndexRelease("acme-imx8-*", "1.0.0", 0, 1000, SHA[0]),
            IndexRelease("acme-imx8-*", "1.1.0", 0, 1100, SHA[1]),
            IndexRelease("acme-imx8-*", "1.2.0", 0, 1200, SHA[2]),
            IndexRelease("acme-x86-?c", "1.2.0", 0, 1300, SHA[3]),
        ),
        deltas=(
            IndexDelta("acme-imx8-*", "1.0.0", "1.1.0", 100, SHA[4]),
            IndexDelta("acme-imx8-*", "1.1.0", "1.2.0", 1500, SHA[5]),
            IndexDelta("acme-x86-?c", "1.1.0", "1.2.0", 130, SHA[6]),
        ),
        rollouts=(
            Rollout("stable", "1.2.0", 3000),
            Rollout("stable", "1.1.0", 6000),
            Rollout("stable", "1.0.0", 10000),
        ),
    )
    data = sign(render_index(index), private)
    shell = ShellReader(tmp_path, busybox_path, [public])
    rng = random.Random(16)
    seen: set[str] = set()
    for _ in range(36):
        device = f"dev-{rng.randrange(10**6)}"
        compatible = rng.choice(["acme-imx8-evk", "acme-x86-pc", "acme-x86-pcx", "other"])
        running = rng.choice(["0.9", "1.0.0", "1.1.0", "1.2.0"])
        accepted, output = shell.run(data, device, compatible, running, "stable")
        assert accepted, output
        expected = python_offer(index, device, compatible, running, "stable")
        assert output.strip() == expected, (device, compatible, running)
        seen.add(expected.split()[0] + " " + expected.split()[1])
    # The seeded sample covers offers, deltas and every reason a static device can see.
    assert {"none rollout", "none current", "none no-release"} <= seen
    assert any(line.startswith("update") for line in seen)


def test_buckets_match_sha256sum_and_widening_only_adds_devices() -> None:
    for device, version in (("dev-1", "1.0.0"), ("store-eu-0042", "2.1.0+build7")):
        digest = subprocess.run(
            ["sha256sum"],
            input=f"avobuild-rollout 1 {version} {device}".encode(),
            capture_output=True,
            check=True,
        ).stdout.decode()[:8]
        assert bucket(device, version) == int(digest, 16) % 10000
    devices = [f"device-{n}" for n in range(10_000)]
    offered_before: set[str] = set()
    for percent in (1, 10, 25, 50, 100):
        offered = {d for d in devices if bucket(d, "1.1.0") < percent * 100}
        assert offered_before <= offered
        assert abs(len(offered) - 100 * percent) <= max(40, 4 * percent), percent
        offered_before = offered
    # Each release picks its own first devices.
    first = {d for d in devices if bucket(d, "1.1.0") < 1000}
    other = {d for d in devices if bucket(d, "1.2.0") < 1000}
    assert len(first & other) < 200


def test_offer_rules_halt_fallback_no_downgrade_and_pending() -> None:
    index = Index(
        "acme",
        1,
        0,
        10,
        releases=(
            IndexRelease("c", "1.0.0", 0, 100, SHA[0]),
            IndexRelease("c", "1.1.0", 0, 100, SHA[1]),
            IndexRelease("c", "1.2.0", 0, 100, SHA[2]),
        ),
        rollouts=(
            Rollout("stable", "1.2.0", 10000),
            Rollout("stable", "1.1.0", 10000),
            Rollout("stable", "1.0.0", 10000),
        ),
    )
    assert choose_offer(index, "d", "c", "1.0.0", "stable").release == index.releases[2]
    # 1.2.0 halted: devices on 1.0.0 get 1.1.0, devices on 1.2.0 are not sent back.
    halted = choose_offer(index, "d", "c", "1.0.0", "stable", {"1.2.0"})
    assert halted.release == index.releases[1]
    assert choose_offer(index, "d", "c", "1.2.0", "stable", {"1.2.0"}).reason is Reason.CURRENT
    everything = choose_offer(index, "d", "c", "1.0.0", "stable", {"1.2.0", "1.1.0", "1.0.0"})
    assert everything.reason is Reason.HALTED
    # A device outside 1.2.0's phase on 1.1.0 waits for it.
    narrow = Index(
        index.repository,
        1,
        0,
        10,
        index.releases,
        (),
        (Rollout("stable", "1.2.0", 0), Rollout("stable", "1.1.0", 10000)),
    )
    waiting = choose_offer(narrow, "d", "c", "1.1.0", "stable")
    assert waiting.reason is Reason.ROLLOUT and waiting.pending == index.releases[2]
    assert choose_offer(narrow, "d", "other", "1.1.0", "stable").reason is Reason.NO_RELEASE


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_update_windows_in_utc_and_a_named_zone_across_dst() -> None:
    night = parse_window("22:00-02:00")
    assert night.is_open(_at("2026-06-01T23:30:00"))
    assert night.is_open(_at("2026-06-02T01:59:00"))
    assert not night.is_open(_at("2026-06-02T02:00:00"))
    assert night.seconds_until_open(_at("2026-06-02T21:00:00")) == 3600
    berlin = parse_window("02:00-04:00", "Europe/Berlin")
    # Summer (UTC+2): 02:00-04:00 local is 00:00-02:00 UTC; winter (UTC+1): 01:00-03:00 UTC.
    assert berlin.is_open(_at("2026-07-01T00:30:00"))
    assert not berlin.is_open(_at("2026-07-01T02:30:00"))
    assert berlin.is_open(_at("2026-01-15T02:30:00"))
    # 2026-03-29: clocks jump from 02:00 to 03:00 local; the window is 03:00-04:00 local,
    # 01:00-02:00 UTC that day.
    assert not berlin.is_open(_at("2026-03-29T00:59:00"))
    assert berlin.is_open(_at("2026-03-29T01:30:00"))
    assert not berlin.is_open(_at("2026-03-29T02:00:00"))
    whole_day = parse_window("00:00-00:00", "UTC")
    assert whole_day.is_open(_at("2026-03-29T13:37:00"))
    from avobuild.fleet.errors import RepositoryError

    for text, zone in (("25:00-01:00", "UTC"), ("2:00-04:00", "UTC"), ("02:00-04:00", "Mars/Base")):
        with pytest.raises(RepositoryError):
            parse_window(text, zone)
