"""`avobuild repo …`: the static, signed update repository (docs/fleet.md)."""

from __future__ import annotations

import json
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from avobuild.cli.common import JsonOption, app, console, emit, out, step

if TYPE_CHECKING:
    from avobuild.bundle.signing import SigningPlan
    from avobuild.fleet.index import VerifiedIndex

repo_app = typer.Typer(
    help="Publish bundles to a static, signed update repository.", no_args_is_help=True
)
app.add_typer(repo_app, name="repo")

DirArgument = Annotated[Path, typer.Argument(help="The repository directory.")]
KeyOption = Annotated[
    list[Path] | None,
    typer.Option("--key", help="Index signing key, PEM (repeatable; default: repository.toml)."),
]
Pkcs11Option = Annotated[
    list[str] | None,
    typer.Option("--pkcs11", help="Sign the index with a token key: a pkcs11: URI (repeatable)."),
]
Pkcs11ModuleOption = Annotated[
    Path | None, typer.Option(help="PKCS#11 module (.so), unless the URI has module-path=.")
]
CertificateOption = Annotated[
    list[Path] | None,
    typer.Option("--certificate", help="Signer certificate (and chain) to carry, PEM."),
]
PercentOption = Annotated[
    str, typer.Option(help="Share of the channel's devices offered the release, 0-100.")
]

_PERCENT = re.compile(r"([0-9]{1,3})(?:\.([0-9]{1,2}))?")


def parse_percent(text: str) -> int:
    """`12.5` (percent, at most two decimals) as basis points (1250)."""
    from avobuild.fleet.errors import RepositoryError

    match = _PERCENT.fullmatch(text)
    points = int(match.group(1)) * 100 + int((match.group(2) or "").ljust(2, "0")) if match else -1
    if not 0 <= points <= 10000:
        raise RepositoryError(
            f"--percent: expected 0 to 100 with at most two decimals, got {text!r}"
        )
    return points


def _signing(
    keys: list[Path] | None,
    uris: list[str] | None,
    module: Path | None,
    certificates: list[Path] | None,
) -> SigningPlan:
    """The index's signers: the same plan (and PKCS#11 environment) as a bundle's."""
    from avobuild.cli.signing_options import signing_plan

    return signing_plan(
        keys=[path.resolve() for path in keys or []],
        pkcs11=uris,
        pkcs11_module=module.resolve() if module else None,
        certificates=[path.resolve() for path in certificates or []],
    )


def _time(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _index_json(root: Path, verified: VerifiedIndex) -> dict[str, object]:
    index = verified.index
    return {
        "root": str(root),
        "serial": index.serial,
        "expires": index.expires,
        "signers": list(verified.signers),
    }


def _entry_json(entry: Any) -> dict[str, object]:
    return {
        "source": str(entry.source),
        "kind": entry.kind,
        "version": entry.version,
        "from_version": entry.from_version,
        "compatible": entry.compatible,
        "new": entry.new,
        "path": f"bundles/{entry.sha256}.avb",
    }


def _published(root: Path, verified: VerifiedIndex) -> None:
    index = verified.index
    console.print(
        f"{root}: published index serial {index.serial}, expires {_time(index.expires)}, "
        f"signed by {', '.join(verified.signers)}"
    )


@repo_app.command("init")
def repo_init(
    root: DirArgument,
    name: Annotated[str, typer.Option(help="Repository name (devices check it).")],
    bundle_keyring: Annotated[
        Path, typer.Option(help="Keyring every added bundle must verify with.")
    ],
    key: KeyOption = None,
    pkcs11: Pkcs11Option = None,
    pkcs11_module: Pkcs11ModuleOption = None,
    certificate: CertificateOption = None,
    index_keyring: Annotated[
        Path | None,
        typer.Option(
            help="The keyring devices verify the index with (default: the signers' public keys, "
            "written to DIR/index-keyring.pem)."
        ),
    ] = None,
    validity: Annotated[
        str, typer.Option(help="How long an index stays valid: 7d, 12h, 30m, 90s.")
    ] = "7d",
    default_channel: Annotated[str, typer.Option(help="Channel of devices that name none.")] = (
        "stable"
    ),
    delta_key: Annotated[
        Path | None, typer.Option(help="Key that signs the deltas `repo deltas` builds.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a repository and publish its first, empty index."""
    from avobuild.fleet.errors import RepositoryError
    from avobuild.fleet.index import check_identifier
    from avobuild.fleet.repository import init_repository
    from avobuild.fleet.settings import parse_duration

    try:
        seconds = parse_duration(validity)
    except ValueError:
        raise RepositoryError(
            f"--validity: expected 7d, 12h, 30m or 90s, got {validity!r}"
        ) from None
    signing = _signing(key, pkcs11, pkcs11_module, certificate)
    verified = init_repository(
        root,
        name=check_identifier("--name", name),
        signing=signing,
        bundle_keyring=bundle_keyring,
        index_keyring=index_keyring,
        validity=seconds,
        default_channel=default_channel,
        delta_key=delta_key,
    )
    if as_json:
        emit(True, {"public": str(root / "public"), "index": _index_json(root, verified)})
        return
    _published(root, verified)
    out.print(str(root / "public"))


@repo_app.command("add")
def repo_add(
    root: DirArgument,
    bundles: Annotated[list[Path], typer.Argument(help="Full or delta .avb bundles.")],
    channel: Annotated[
        str | None, typer.Option(help="Promote the new releases to this channel.")
    ] = None,
    percent: PercentOption = "100",
    key: KeyOption = None,
    pkcs11: Pkcs11Option = None,
    pkcs11_module: Pkcs11ModuleOption = None,
    certificate: CertificateOption = None,
    as_json: JsonOption = False,
) -> None:
    """Verify bundles, copy them in (content-addressed) and publish a new index."""
    from avobuild.fleet.repository import add_bundles

    added, verified = add_bundles(
        root,
        bundles,
        channel=channel,
        basis_points=parse_percent(percent),
        signing=_signing(key, pkcs11, pkcs11_module, certificate),
    )
    if as_json:
        document = {"added": [_entry_json(e) for e in added], "index": _index_json(root, verified)}
        emit(True, document)
        return
    for entry in added:
        what = (
            f"release {entry.version} for {entry.compatible}"
            if entry.kind == "release"
            else f"delta {entry.from_version} -> {entry.version} for {entry.compatible}"
        )
        state = "added" if entry.new else "already present"
        out.print(f"{entry.source}: {what}: {state} as bundles/{entry.sha256}.avb")
    _published(root, verified)


@repo_app.command("promote")
def repo_promote(
    root: DirArgument,
    version: Annotated[str, typer.Argument(help="The release version to offer.")],
    channel: Annotated[str, typer.Option(help="The channel, e.g. stable or beta.")],
    percent: PercentOption = "100",
    narrow: Annotated[
        bool,
        typer.Option("--narrow", help="Allow a lower percent than before (or 0: a pause)."),
    ] = False,
    key: KeyOption = None,
    pkcs11: Pkcs11Option = None,
    pkcs11_module: Pkcs11ModuleOption = None,
    certificate: CertificateOption = None,
    as_json: JsonOption = False,
) -> None:
    """Offer a release in a channel to a share of its devices (phased rollout)."""
    from avobuild.fleet.repository import promote

    basis_points = parse_percent(percent)
    verified = promote(
        root,
        version,
        channel,
        basis_points,
        narrow=narrow,
        signing=_signing(key, pkcs11, pkcs11_module, certificate),
    )
    if as_json:
        document = {
            "version": version,
            "channel": channel,
            "percent": basis_points / 100,
            "index": _index_json(root, verified),
        }
        emit(True, document)
        return
    out.print(f"{version}: offered to {basis_points / 100:g} % of channel {channel}")
    _published(root, verified)


@repo_app.command("refresh")
def repo_refresh(
    root: DirArgument,
    key: KeyOption = None,
    pkcs11: Pkcs11Option = None,
    pkcs11_module: Pkcs11ModuleOption = None,
    certificate: CertificateOption = None,
    as_json: JsonOption = False,
) -> None:
    """Re-sign the index with the next serial and a new expiry (run it from cron)."""
    from avobuild.fleet.repository import refresh_index

    verified = refresh_index(root, _signing(key, pkcs11, pkcs11_module, certificate))
    if as_json:
        emit(True, {"index": _index_json(root, verified)})
        return
    _published(root, verified)


@repo_app.command("status")
def repo_status(
    root: DirArgument,
    as_json: JsonOption = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Hash every bundle file against the catalog.")
    ] = False,
) -> None:
    """Releases, deltas, channels and the published index."""
    from avobuild.fleet.errors import RepositoryError
    from avobuild.fleet.repository import repository_status

    status = repository_status(root, verify_files=verify)
    if as_json:
        out.print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    problems = status.get("problems") or []
    if problems or "error" in status["index"]:
        raise RepositoryError("; ".join([*problems, status["index"].get("error", "")]).strip("; "))


def _print_status(status: dict[str, Any]) -> None:
    index = status["index"]
    out.print(f"repository: {status['repository']} ({status['root']})")
    if "error" in index:
        out.print(f"index:      NOT VALID: {index['error']}")
    else:
        out.print(
            f"index:      serial {index['serial']}, issued {_time(index['issued'])}, "
            f"expires {_time(index['expires'])}"
        )
    for release in status["releases"]:
        channels = ", ".join(f"{name} {share:g} %" for name, share in release["channels"].items())
        out.print(
            f"release {release['version']} for {release['compatible']}: {release['size']} bytes"
            + (f", in {channels}" if channels else "")
        )
    for delta in status["deltas"]:
        out.print(
            f"delta {delta['from']} -> {delta['to']} for {delta['compatible']}: "
            f"{delta['size']} bytes"
        )
    for problem in status.get("problems", []):
        out.print(f"PROBLEM: {problem}")


@repo_app.command("deltas")
def repo_deltas(
    root: DirArgument,
    plan: Annotated[
        bool, typer.Option("--plan", help="Print the pairs to build as JSON; build nothing.")
    ] = False,
    pair: Annotated[
        str | None,
        typer.Option(help="Build only FROM:TO, into --output (for one CI job per pair)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="With --pair: the delta to write.")
    ] = None,
    compatible: Annotated[
        str | None, typer.Option(help="With --pair: the compatible string, when ambiguous.")
    ] = None,
    previous: Annotated[
        int | None,
        typer.Option(help="Deltas from this many previous releases (default: [deltas] previous)."),
    ] = None,
    key: Annotated[
        Path | None, typer.Option(help="Key that signs the deltas (default: [deltas] key).")
    ] = None,
    jobs: Annotated[int | None, typer.Option(help="Deltas built at once (default: cores).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Build the deltas from the previous releases to the newest one, and publish them."""
    from avobuild.cli.delta import stats_line
    from avobuild.fleet.catalog import load_catalog
    from avobuild.fleet.deltas import build_deltas, delta_key, find_pair, plan_deltas
    from avobuild.fleet.errors import RepositoryError
    from avobuild.fleet.repository import add_bundles
    from avobuild.fleet.settings import load_settings

    settings = load_settings(root)
    catalog = load_catalog(root)
    if pair is not None:
        if output is None:
            raise RepositoryError("--pair: give --output for the delta bundle")
        chosen = find_pair(catalog, pair, compatible)
        (one,) = build_deltas(settings, [chosen], [output], key=delta_key(settings, key))
        if as_json:
            document = {
                "path": str(output),
                "full_size": one.full_size,
                "delta_size": one.delta_size,
                "reduction": round(_reduction(one), 2),
            }
            emit(True, document)
            return
        console.print(f"{pair}: " + stats_line(one.full_size, one.delta_size, _reduction(one)))
        out.print(str(output))
        return
    pairs = plan_deltas(catalog, settings.deltas.previous if previous is None else previous)
    if plan:
        out.print(json.dumps([p.as_json() for p in pairs], indent=2))
        return
    if not pairs:
        console.print(f"{root}: every delta is already present")
        if as_json:
            emit(True, {"added": [], "index": None})
        return
    signing_key = delta_key(settings, key)
    with tempfile.TemporaryDirectory(prefix="avobuild-deltas-") as work:
        outputs = [Path(work) / f"{i}.avb" for i in range(len(pairs))]
        step(f"building {len(pairs)} delta(s)")
        built = build_deltas(
            settings,
            pairs,
            outputs,
            key=signing_key,
            jobs=jobs,
            done=lambda result: console.print(
                f"{result.pair.from_version} -> {result.pair.to_version}: "
                + stats_line(result.full_size, result.delta_size, _reduction(result))
            ),
        )
        added, verified = add_bundles(root, [result.path for result in built])
    if as_json:
        document = {"added": [_entry_json(e) for e in added], "index": _index_json(root, verified)}
        emit(True, document)
        return
    for entry in added:
        out.print(
            f"delta {entry.from_version} -> {entry.version} for {entry.compatible}: "
            f"bundles/{entry.sha256}.avb"
        )
    _published(root, verified)


def _reduction(built: Any) -> float:
    return 100.0 * (1 - built.delta_size / built.full_size) if built.full_size else 0.0
