"""`avobuild repo`: the static, signed update repository, built from real bundles.

Oracles: the published index read back by the reference reader and checked independently with
`openssl` (its signature over the body bytes); the files under public/ hashed again; the
catalog and settings read back; deltas applied with `avobuild delta apply` and compared with
the images of the full bundles; the old index and catalog byte for byte after every refusal.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import avobuild_cli, file_sha256
from test_fleet_support import (
    COMPATIBLE,
    Releases,
    index_key,
    init_repository,
    release_bundles,
)

from avobuild.bundle.keys import load_keyring
from avobuild.bundle.reader import BundleReader
from avobuild.errors import RecipeError
from avobuild.fleet.catalog import load_catalog
from avobuild.fleet.errors import IndexRefused, RepositoryError
from avobuild.fleet.index import read_signed_index, split_signed_index
from avobuild.fleet.repository import index_path
from avobuild.fleet.settings import load_settings


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return release_bundles(tmp_path_factory)


def public_files(repository: Path) -> dict[str, bytes]:
    """Every file under public/ (and the catalog), for byte-for-byte comparisons."""
    files = {
        str(path.relative_to(repository)): path.read_bytes()
        for path in sorted((repository / "public").rglob("*"))
        if path.is_file()
    }
    files["catalog.toml"] = (repository / "catalog.toml").read_bytes()
    return files


def verify_with_openssl(data: bytes, public_key: Path, work: Path) -> None:
    """Check the index's Ed25519 signature with openssl, as a device would."""
    body, block = split_signed_index(data)
    key_id = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", public_key, "-outform", "DER"],
        capture_output=True,
        check=True,
    ).stdout
    wanted = hashlib.sha256(key_id).hexdigest()
    line = next(
        line
        for line in block.decode().splitlines()
        if line.startswith(f"signature ed25519 {wanted} ")
    )
    (work / "body").write_bytes(body)
    (work / "sig").write_bytes(base64.b64decode(line.split()[3]))
    subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            public_key,
            "-rawin",
            "-in",
            work / "body",
            "-sigfile",
            work / "sig",
        ],
        check=True,
        capture_output=True,
    )


def test_init_add_promote_status(tmp_path: Path, releases: Releases) -> None:
    key = index_key(tmp_path / "keys")
    repository = tmp_path / "repo"
    init_repository(repository, releases, key, "--validity", "2d")
    # The settings file is TOML written by avobuild and read back strictly.
    settings = load_settings(repository)
    assert settings.name == "acme" and settings.index_validity == 2 * 86400
    assert settings.bundle_keyring == releases.public_key.resolve()
    first = read_signed_index(
        index_path(repository).read_bytes(),
        load_keyring(repository / "index-keyring.pem"),
        now=int(time.time()),
    )
    assert first.index.serial == 1 and first.index.releases == ()

    added = avobuild_cli(
        "repo",
        "add",
        repository,
        releases.bundles["1.0.0"],
        releases.bundles["1.1.0"],
        "--channel",
        "stable",
    )
    assert "release 1.0.0 for testprod-x86_64: added" in added.stdout
    avobuild_cli("repo", "promote", repository, "1.1.0", "--channel", "beta", "--percent", "12.5")
    data = index_path(repository).read_bytes()
    verify_with_openssl(data, tmp_path / "keys" / "index.pub.pem", tmp_path)
    verified = read_signed_index(
        data, load_keyring(repository / "index-keyring.pem"), now=first.index.issued + 60
    )
    index = verified.index
    assert index.serial == 3
    assert index.expires - index.issued == 2 * 86400
    assert [(r.version, r.compatible) for r in index.releases] == [
        ("1.0.0", COMPATIBLE),
        ("1.1.0", COMPATIBLE),
    ]
    assert [(r.channel, r.version, r.basis_points) for r in index.rollouts] == [
        ("beta", "1.1.0", 1250),
        ("stable", "1.1.0", 10000),
        ("stable", "1.0.0", 10000),
    ]
    for release in index.releases:
        path = repository / "public" / release.path
        bundle = releases.bundles[release.version]
        assert file_sha256(path) == release.sha256 == file_sha256(bundle)
        assert path.stat().st_size == release.size
        with BundleReader.open(path) as reader:
            reader.verify_signature(load_keyring(releases.public_key))
            assert reader.manifest.version == release.version

    status = json.loads(avobuild_cli("repo", "status", repository, "--json", "--verify").stdout)
    assert status["index"]["serial"] == 3 and status["problems"] == []
    assert {r["version"]: r["channels"] for r in status["releases"]} == {
        "1.0.0": {"stable": 100.0},
        "1.1.0": {"beta": 12.5, "stable": 100.0},
    }
    # Adding the same bundle again changes nothing but the serial.
    again = avobuild_cli("repo", "add", repository, releases.bundles["1.0.0"])
    assert "already present" in again.stdout
    assert len(load_catalog(repository).releases) == 2

    # Narrowing needs --narrow: the devices offered 12.5 % keep it otherwise.
    before = public_files(repository)
    narrowed = avobuild_cli(
        "repo", "promote", repository, "1.1.0", "--channel", "beta", "--percent", "5", check=False
    )
    assert narrowed.returncode == RepositoryError.exit_code and "--narrow" in narrowed.stderr
    assert public_files(repository) == before
    avobuild_cli(
        "repo", "promote", repository, "1.1.0", "--channel", "beta", "--percent", "0", "--narrow"
    )
    assert load_catalog(repository).channel("beta").rollout("1.1.0").basis_points == 0


def test_bad_bundles_and_settings_are_refused_and_nothing_changes(
    tmp_path: Path, releases: Releases
) -> None:
    repository = tmp_path / "repo"
    init_repository(repository, releases, index_key(tmp_path / "keys"))
    avobuild_cli("repo", "add", repository, releases.bundles["1.0.0"])
    before = public_files(repository)

    tampered = tmp_path / "tampered.avb"
    data = bytearray(releases.bundles["1.1.0"].read_bytes())
    data[len(data) // 2] ^= 0x40
    tampered.write_bytes(bytes(data))
    foreign_key = index_key(tmp_path / "other", "release")
    foreign = tmp_path / "foreign.avb"
    avobuild_cli(
        "bundle",
        "resign",
        releases.bundles["1.1.0"],
        "-o",
        foreign,
        "--replace",
        "--key",
        foreign_key,
    )
    truncated = tmp_path / "truncated.avb"
    truncated.write_bytes(releases.bundles["1.1.0"].read_bytes()[:5000])
    cases = {
        tampered: "sha256 mismatch",
        foreign: "not in keyring",
        truncated: "truncated",
        tmp_path / "missing.avb": "no such file",
    }
    for bundle, message in cases.items():
        result = avobuild_cli(
            "repo", "add", repository, releases.bundles["1.1.0"], bundle, check=False
        )
        assert result.returncode != 0 and message in result.stderr, (bundle, result.stderr)
        # The good bundle given first is not half-added either.
        assert public_files(repository) == before, bundle
    assert not list((repository / "public" / "bundles").glob(".*"))

    settings = repository / "repository.toml"
    original = settings.read_text()
    for text, message in (
        (original.replace("minimum-devices = 5", "failure-treshold = 5"), "[rollouts]"),
        (original.replace('index-validity = "7d"', 'index-validity = "a week"'), "index-validity"),
        (original + '\n[channel.night]\nwindow = "25:00-02:00"\n', "[channel.night] window"),
        (original + '\n[group.x]\ndevices = ["a b"]\n', "devices[0]"),
    ):
        settings.write_text(text)
        result = avobuild_cli(
            "repo", "promote", repository, "1.0.0", "--channel", "stable", check=False
        )
        assert result.returncode == RepositoryError.exit_code, result.stderr
        assert "repository.toml" in result.stderr and message in result.stderr, result.stderr
    settings.write_text(original)
    assert public_files(repository) == before


@pytest.mark.slow  # builds and applies five deltas: about half a minute
def test_deltas_plan_pair_pool_and_content_addressing(tmp_path: Path, releases: Releases) -> None:
    repository = tmp_path / "repo"
    init_repository(repository, releases, index_key(tmp_path / "keys"))
    avobuild_cli("repo", "add", repository, *(releases.bundles[v] for v in ("1.0.0", "1.1.0")))
    plan = json.loads(avobuild_cli("repo", "deltas", repository, "--plan").stdout)
    assert [(p["from"], p["to"]) for p in plan] == [("1.0.0", "1.1.0")]

    # One CI job builds the pair, the pipeline adds the result.
    job = tmp_path / "job.avb"
    avobuild_cli("repo", "deltas", repository, "--pair", "1.0.0:1.1.0", "-o", job)
    avobuild_cli("repo", "add", repository, job)
    assert json.loads(avobuild_cli("repo", "deltas", repository, "--plan").stdout) == []

    # A new release: deltas from both previous ones, built in a process pool.
    avobuild_cli("repo", "add", repository, releases.bundles["1.2.0"])
    plan = json.loads(avobuild_cli("repo", "deltas", repository, "--plan").stdout)
    assert [(p["from"], p["to"]) for p in plan] == [("1.1.0", "1.2.0"), ("1.0.0", "1.2.0")]
    built = avobuild_cli("repo", "deltas", repository, "--jobs", "2")
    assert built.stdout.count("delta ") == 2, built.stdout
    catalog = load_catalog(repository)
    assert sorted((d.from_version, d.to_version) for d in catalog.deltas) == [
        ("1.0.0", "1.1.0"),
        ("1.0.0", "1.2.0"),
        ("1.1.0", "1.2.0"),
    ]
    # Nothing is built twice: the pair of full bundles is the address.
    stamps = {p: p.stat().st_mtime_ns for p in (repository / "public" / "bundles").iterdir()}
    again = avobuild_cli("repo", "deltas", repository)
    assert "already present" in again.stderr
    assert {
        p: p.stat().st_mtime_ns for p in (repository / "public" / "bundles").iterdir()
    } == stamps
    rebuilt = tmp_path / "again.avb"
    avobuild_cli("repo", "deltas", repository, "--pair", "1.0.0:1.1.0", "-o", rebuilt)
    assert "already present" in avobuild_cli("repo", "add", repository, rebuilt).stdout

    # Each delta, applied to its source release's image, gives the target release's image.
    index = read_signed_index(
        index_path(repository).read_bytes(),
        load_keyring(repository / "index-keyring.pem"),
        now=catalog.deltas[-1].added,
    ).index
    images: dict[str, Path] = {}
    for version in ("1.0.0", "1.1.0"):
        with BundleReader.open(releases.bundles[version]) as reader:
            reader.verify_signature(load_keyring(releases.public_key))
            target = tmp_path / f"rootfs-{version}.img"
            with target.open("wb") as handle:
                for _, _, chunk in reader.iter_chunks():
                    handle.write(chunk)
            images[version] = target
    for delta in index.deltas:
        if delta.from_version not in images:
            continue
        output = tmp_path / f"{delta.from_version}-{delta.to_version}.img"
        avobuild_cli(
            "delta",
            "apply",
            repository / "public" / delta.path,
            "--source",
            f"rootfs={images[delta.from_version]}",
            "--output",
            f"rootfs={output}",
            "--keyring",
            releases.public_key,
        )
        expected = load_catalog(repository).releases_of(delta.to_version)[0].image("rootfs")
        assert expected is not None and file_sha256(output) == expected.sha256
        assert delta.size < index.release(delta.to_version, COMPATIBLE).size


def test_index_signers_threshold_and_a_pkcs11_token(tmp_path: Path, releases: Releases) -> None:
    """Two key files under a threshold-2 keyring; a signer the keyring does not know is
    caught before publishing; a SoftHSM2 token key signs a refresh."""
    first = index_key(tmp_path / "keys", "first")
    second = index_key(tmp_path / "keys", "second", "ecdsa-p256")
    keyring = tmp_path / "index-keyring.toml"
    keyring.write_text('threshold = 2\nkeys = ["keys/first.pub.pem", "keys/second.pub.pem"]\n')
    repository = tmp_path / "repo"
    avobuild_cli(
        "repo",
        "init",
        repository,
        "--name",
        "acme",
        "--bundle-keyring",
        releases.public_key,
        "--key",
        first,
        "--key",
        second,
        "--index-keyring",
        keyring,
    )
    verified = read_signed_index(
        index_path(repository).read_bytes(), load_keyring(keyring), now=int(time.time())
    )
    assert len(verified.signers) == 2
    before = public_files(repository)
    alone = avobuild_cli("repo", "refresh", repository, "--key", first, check=False)
    assert alone.returncode == RepositoryError.exit_code
    assert "does not verify with the devices' keyring" in alone.stderr
    assert "requires 2 trusted signatures" in alone.stderr
    assert public_files(repository) == before

    softhsm = Path("/usr/lib/softhsm/libsofthsm2.so")
    if not softhsm.exists():
        pytest.fail("softhsm2 is not installed (scripts/host-packages.d/security.txt)")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    config = tmp_path / "softhsm2.conf"
    config.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    environment = {**os.environ, "SOFTHSM2_CONF": str(config)}
    token_key = tmp_path / "token.key.pem"
    subprocess.run(
        [
            "openssl",
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            token_key,
        ],
        check=True,
    )
    subprocess.run(
        ["openssl", "pkey", "-in", token_key, "-pubout", "-out", tmp_path / "token.pub.pem"],
        check=True,
    )
    for argv in (
        ["--init-token", "--free", "--label", "index", "--pin", "1234", "--so-pin", "5678"],
        [
            "--import",
            str(token_key),
            "--token",
            "index",
            "--label",
            "idx",
            "--id",
            "01",
            "--pin",
            "1234",
        ],
    ):
        subprocess.run(["softhsm2-util", *argv], env=environment, check=True, capture_output=True)
    keyring.write_text('threshold = 2\nkeys = ["keys/first.pub.pem", "token.pub.pem"]\n')
    result = subprocess.run(
        [
            str(Path(__file__).parent.parent / ".venv/bin/avobuild"),
            "repo",
            "refresh",
            str(repository),
            "--key",
            str(first),
            "--pkcs11",
            f"pkcs11:token=index;object=idx?pin-value=1234&module-path={softhsm}",
        ],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    verified = read_signed_index(
        index_path(repository).read_bytes(), load_keyring(keyring), now=int(time.time())
    )
    assert verified.index.serial == 2 and len(verified.signers) == 2


def test_publishing_is_atomic_for_readers(tmp_path: Path, releases: Releases) -> None:
    """A reader polling index.signed while the repository publishes over and over sees only
    complete indexes that verify, with serials that never go back."""
    repository = tmp_path / "repo"
    init_repository(repository, releases, index_key(tmp_path / "keys"))
    avobuild_cli("repo", "add", repository, releases.bundles["1.0.0"])
    keyring = load_keyring(repository / "index-keyring.pem")
    path = index_path(repository)
    stop = threading.Event()
    serials: list[int] = []
    failures: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                index = read_signed_index(path.read_bytes(), keyring, now=int(time.time())).index
            except (IndexRefused, OSError) as error:
                failures.append(str(error))
                continue
            serials.append(index.serial)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        from avobuild.fleet.repository import promote

        for step in range(1, 31):
            promote(repository, "1.0.0", "stable", step * 100)
    finally:
        stop.set()
        thread.join()
    assert failures == []
    # The reader may stop before the last publication: the index left behind is the last one.
    last = read_signed_index(path.read_bytes(), keyring, now=int(time.time())).index.serial
    assert serials == sorted(serials) and serials[-1] <= last == 32 and len(set(serials)) > 5


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_leaves_the_repository_as_it_was(tmp_path: Path, releases: Releases) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mount], check=True)
    try:
        repository = mount / "repo"
        init_repository(repository, releases, index_key(tmp_path / "keys"))
        avobuild_cli("repo", "add", repository, releases.bundles["1.0.0"])
        before = public_files(repository)
        filler = mount / "filler"
        with filler.open("wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(bytes(64 << 10))
            except OSError:
                pass
        result = avobuild_cli("repo", "add", repository, releases.bundles["1.1.0"], check=False)
        assert result.returncode == RepositoryError.exit_code
        assert "no space left on the device" in result.stderr, result.stderr
        assert public_files(repository) == before
        assert not list(repository.rglob(".*.tmp"))
        # Once there is room again, the same command works.
        filler.unlink()
        avobuild_cli("repo", "add", repository, releases.bundles["1.1.0"])
        assert len(load_catalog(repository).releases) == 2
    finally:
        subprocess.run(["umount", mount], check=True)


def test_the_same_content_and_clock_give_the_same_index(tmp_path: Path, releases: Releases) -> None:
    """Two repositories built from the same bundles, keys and clock publish identical bytes
    (Ed25519 signatures are deterministic; the catalog records the same times)."""
    from avobuild.fleet.repository import add_bundles
    from avobuild.fleet.repository import init_repository as init
    from avobuild.fleet.signing import SigningPlan

    key = index_key(tmp_path / "keys")
    published = []
    for name in ("one", "two"):
        repository = tmp_path / name
        init(
            repository,
            name="acme",
            signing=SigningPlan(keys=(key,)),
            bundle_keyring=releases.public_key,
            clock=lambda: 1796000000,
        )
        add_bundles(
            repository,
            [releases.bundles["1.0.0"], releases.bundles["1.1.0"]],
            channel="stable",
            basis_points=2500,
            clock=lambda: 1796000100,
        )
        published.append(
            (index_path(repository).read_bytes(), (repository / "catalog.toml").read_bytes())
        )
    assert published[0] == published[1]
    body, _ = split_signed_index(published[0][0])
    assert b"\nissued 1796000100\nexpires 1796604900\n" in body


def test_command_line_errors_name_what_is_wrong(tmp_path: Path, releases: Releases) -> None:
    repository = tmp_path / "repo"
    key = index_key(tmp_path / "keys")
    init_repository(repository, releases, key)
    avobuild_cli("repo", "add", repository, releases.bundles["1.0.0"])
    cases = [
        (
            (
                "repo",
                "init",
                repository,
                "--name",
                "acme",
                "--bundle-keyring",
                releases.public_key,
                "--key",
                key,
            ),
            RepositoryError.exit_code,
            "already exists",
        ),
        (
            (
                "repo",
                "init",
                tmp_path / "x",
                "--name",
                "bad name",
                "--bundle-keyring",
                releases.public_key,
                "--key",
                key,
            ),
            7,
            "--name",
        ),
        (
            ("repo", "promote", repository, "9.9", "--channel", "stable"),
            RepositoryError.exit_code,
            "not in the repository (releases: 1.0.0)",
        ),
        (
            ("repo", "promote", repository, "1.0.0", "--channel", "stable", "--percent", "100.5"),
            RepositoryError.exit_code,
            "--percent",
        ),
        (("repo", "promote", repository, "1.0.0", "--channel", "Stable"), 7, "channel"),
        (("repo", "status", tmp_path), RepositoryError.exit_code, "not an update repository"),
        (
            ("repo", "deltas", repository, "--pair", "1.0.0", "-o", tmp_path / "d.avb"),
            RepositoryError.exit_code,
            "expected FROM:TO",
        ),
        (
            (
                "fleet",
                "report",
                "--repository",
                repository,
                "--from",
                "2026-13-01",
                "--to",
                "2026-12-31",
            ),
            RecipeError.exit_code,
            "--from",
        ),
        (
            (
                "fleet",
                "report",
                "--repository",
                repository,
                "--from",
                "2026-01-01",
                "--to",
                "2026-12-31",
                "--format",
                "xml",
            ),
            RecipeError.exit_code,
            "--format",
        ),
        (
            ("fleet", "resume", "1.0.0", "--channel", "stable", "--repository", repository),
            RepositoryError.exit_code,
            "is not halted",
        ),
    ]
    for argv, code, message in cases:
        result = avobuild_cli(*argv, check=False)
        assert result.returncode == code and message in result.stderr, (argv, result.stderr)
    assert not (tmp_path / "x" / "repository.toml").exists()
