"""A static, signed update repository: a directory any web server or CDN can serve.

```
DIR/repository.toml          settings (settings.py)
DIR/catalog.toml             what the repository holds (catalog.py)
DIR/index-keyring.pem        the public keys of the index signers, made by `repo init`
DIR/public/index.signed      the signed index devices read (docs/repository-format.md)
DIR/public/bundles/SHA.avb   every full and delta bundle, named by its own sha256
```

Only `public/` is published. Bundles are content-addressed, so a file never changes once it
exists and caches may keep it forever; the index is the one file that changes, always by an
atomic rename (publish.py). A bundle is copied in while it is hashed, then verified from the
copy (its signature with the repository's bundle keyring, every chunk and image hash) before
it gets its final name; the index is re-read and verified with the devices' index keyring
before it replaces the old one, so a signer the devices would refuse is caught here.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from avobuild.bundle.keys import Keyring, load_keyring
from avobuild.bundle.manifest import EMPTY_SHA256, BundleType, Manifest
from avobuild.bundle.reader import BundleReader
from avobuild.errors import BundleError
from avobuild.fleet.catalog import (
    CATALOG_FILE,
    Catalog,
    CatalogDelta,
    CatalogRelease,
    CatalogRollout,
    Channel,
    ImageHash,
    load_catalog,
    render_catalog,
)
from avobuild.fleet.errors import IndexRefused, RepositoryError
from avobuild.fleet.index import (
    BASIS_POINTS,
    Index,
    IndexDelta,
    IndexRelease,
    Rollout,
    VerifiedIndex,
    bundle_path,
    check_channel,
    frame_index,
    read_signed_index,
    render_index,
    sort_deltas,
    sort_releases,
)
from avobuild.fleet.publish import (
    describe_os_error,
    replace_files,
    repository_lock,
    sync_directory,
    temporary_name,
    write_atomically,
    write_temporary,
)
from avobuild.fleet.settings import (
    SETTINGS_FILE,
    Settings,
    load_settings,
    render_settings,
)
from avobuild.fleet.signing import (
    IndexSigners,
    SigningPlan,
    load_index_keyring,
    open_index_signers,
    sign_index_body,
)

PUBLIC = "public"
INDEX_FILE = "index.signed"
KEYRING_FILE = "index-keyring.pem"
_COPY_BLOCK = 1 << 20

Clock = Callable[[], float]


def public_root(root: Path) -> Path:
    return root / PUBLIC


def index_path(root: Path) -> Path:
    return root / PUBLIC / INDEX_FILE


@dataclass(frozen=True)
class Added:
    """What `add_bundles` did with one file."""

    source: Path
    kind: str  # "release" or "delta"
    version: str
    compatible: str
    sha256: str
    new: bool
    from_version: str | None = None


# --- init --------------------------------------------------------------------------------------


def init_repository(
    root: Path,
    *,
    name: str,
    signing: SigningPlan,
    bundle_keyring: Path,
    index_keyring: Path | None = None,
    validity: int | None = None,
    default_channel: str | None = None,
    delta_key: Path | None = None,
    clock: Clock = time.time,
) -> VerifiedIndex:
    """Create the repository and publish its first (empty) index, serial 1."""
    if (root / SETTINGS_FILE).exists():
        raise RepositoryError(f"{root / SETTINGS_FILE}: already exists; refusing to overwrite it")
    load_keyring(bundle_keyring)
    try:
        (root / PUBLIC / "bundles").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise describe_os_error(root, error, "create the repository") from None
    root = root.resolve()
    settings = Settings(root=root, name=name)
    settings = replace(
        settings,
        signing=signing,
        bundle_keyring=bundle_keyring.resolve(),
        index_keyring=index_keyring.resolve() if index_keyring else root / KEYRING_FILE,
        index_validity=validity or settings.index_validity,
        default_channel=check_channel(default_channel or settings.default_channel),
        deltas=replace(settings.deltas, key=delta_key.resolve() if delta_key else None),
    )
    with repository_lock(root), open_index_signers(signing) as signers:
        if index_keyring is None:
            write_atomically(root / KEYRING_FILE, signers.public_keys_pem())
        write_atomically(root / SETTINGS_FILE, render_settings(settings))
        write_atomically(root / CATALOG_FILE, render_catalog(Catalog()))
        return publish_index(load_settings(root), load_catalog(root), signers, clock)


# --- the index ---------------------------------------------------------------------------------


def build_index(settings: Settings, catalog: Catalog, serial: int, issued: int) -> Index:
    by_sha = {release.sha256: release for release in catalog.releases}
    releases = sort_releases(
        [
            IndexRelease(r.compatible, r.version, r.security_version, r.size, r.sha256)
            for r in catalog.releases
        ]
    )
    deltas = sort_deltas(
        [
            IndexDelta(
                by_sha[d.to_bundle].compatible, d.from_version, d.to_version, d.size, d.sha256
            )
            for d in catalog.deltas
        ]
    )
    rollouts = tuple(
        Rollout(channel.name, rollout.version, rollout.basis_points)
        for channel in sorted(catalog.channels, key=lambda c: c.name.encode())
        for rollout in channel.rollouts
    )
    return Index(
        settings.name,
        serial,
        issued,
        issued + settings.index_validity,
        releases,
        deltas,
        rollouts,
    )


def publish_index(
    settings: Settings, catalog: Catalog, signers: IndexSigners, clock: Clock = time.time
) -> VerifiedIndex:
    """Sign the next index, check it with the devices' keyring, write catalog and index.

    The caller holds the repository lock.
    """
    root = settings.root
    issued = int(clock())
    serial = catalog.serial + 1
    body = render_index(build_index(settings, catalog, serial, issued))
    data = frame_index(body, sign_index_body(body, signers))
    verified = verify_published(settings, data, now=issued)
    catalog = replace(catalog, serial=serial)
    final = index_path(root)
    pending = [(write_temporary(root / CATALOG_FILE, render_catalog(catalog)), root / CATALOG_FILE)]
    try:
        pending.append((write_temporary(final, data), final))
    except RepositoryError:
        pending[0][0].unlink(missing_ok=True)
        raise
    replace_files(pending)
    return verified


def verify_published(settings: Settings, data: bytes, *, now: int) -> VerifiedIndex:
    keyring = _index_keyring(settings)
    try:
        return read_signed_index(
            data, keyring, now=now, repository=settings.name, name=str(index_path(settings.root))
        )
    except IndexRefused as error:
        raise RepositoryError(
            f"the new index does not verify with the devices' keyring {settings.index_keyring}, "
            f"so it was not published: {error}"
        ) from None


def _index_keyring(settings: Settings) -> Keyring:
    if settings.index_keyring is None:
        raise RepositoryError(
            f"{settings.path}: [signing] keyring: missing (the keyring devices verify the index "
            "with)"
        )
    return load_index_keyring(settings.index_keyring)


def read_index(root: Path, *, now: int | None = None) -> VerifiedIndex:
    """The published index, verified with the repository's own index keyring."""
    settings = load_settings(root)
    path = index_path(root)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RepositoryError(f"{path}: cannot read the index: {error.strerror}") from None
    return read_signed_index(
        data,
        _index_keyring(settings),
        now=int(time.time()) if now is None else now,
        repository=settings.name,
        name=str(path),
    )


def _signing(settings: Settings, override: SigningPlan | None) -> SigningPlan:
    """The command line's signers if it names any, else the repository's, with the command
    line's token module and PIN (the CLI reads them from the environment)."""
    if override is None:
        return settings.signing
    if override.has_signers:
        return override
    return replace(
        settings.signing,
        pkcs11_module=settings.signing.pkcs11_module or override.pkcs11_module,
        pkcs11_pin=override.pkcs11_pin,
    )


def refresh_index(
    root: Path, signing: SigningPlan | None = None, clock: Clock = time.time
) -> VerifiedIndex:
    """Re-sign the same content with the next serial and a new expiry (run it from cron)."""
    with repository_lock(root):
        settings = load_settings(root)
        with open_index_signers(_signing(settings, signing)) as signers:
            return publish_index(settings, load_catalog(root), signers, clock)


# --- adding bundles ----------------------------------------------------------------------------


def _copy_hashing(source: Path, destination: Path) -> tuple[str, int]:
    """Copy `source` to the new file `destination`, returning its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    try:
        with source.open("rb") as reader, destination.open("xb") as writer:
            while block := reader.read(_COPY_BLOCK):
                digest.update(block)
                writer.write(block)
                size += len(block)
            writer.flush()
            os.fsync(writer.fileno())
    except OSError as error:
        destination.unlink(missing_ok=True)
        if error.filename == str(source) or not source.is_file():
            raise RepositoryError(f"{source}: cannot read: {error.strerror or error}") from None
        raise describe_os_error(destination, error, f"copy {source} into the repository") from None
    return digest.hexdigest(), size


def _verified_manifest(path: Path, source: Path, keyring: Keyring) -> Manifest:
    try:
        with BundleReader.open(path) as reader:
            reader.verify_signature(keyring)
            reader.verify_payload()
            return reader.manifest
    except BundleError as error:
        message = str(error).replace(str(path), str(source))
        raise type(error)(f"{message} (not added)") from None


def _images(manifest: Manifest) -> tuple[ImageHash, ...]:
    return tuple(ImageHash(image.name, image.size, image.sha256) for image in manifest.images)


def _delta_ends(
    manifest: Manifest, catalog: Catalog, source: Path
) -> tuple[CatalogRelease, CatalogRelease]:
    """The two releases a delta bundle joins, found by its source and target image hashes."""

    def joins(release: CatalogRelease, end: str) -> bool:
        for image in manifest.images:
            ref = image.source if end == "source" else image.target
            assert ref is not None
            mine = release.image(image.name)
            if ref.size == 0 and ref.sha256 == EMPTY_SHA256 and end == "source":
                if mine is not None and (mine.size, mine.sha256) != (0, EMPTY_SHA256):
                    return False
                continue
            if mine is None or (mine.size, mine.sha256) != (ref.size, ref.sha256):
                return False
        return True

    targets = [
        r
        for r in catalog.releases
        if r.version == manifest.version
        and r.compatible == manifest.compatible
        and joins(r, "target")
    ]
    if not targets:
        raise RepositoryError(
            f"{source}: a delta to {manifest.version} for {manifest.compatible}, but the "
            "repository holds no full bundle with the images it produces; add that release first"
        )
    sources = [r for r in catalog.releases if r is not targets[0] and joins(r, "source")]
    if not sources:
        raise RepositoryError(
            f"{source}: the delta's source images match no release in the repository; add the "
            "full bundle it was made from first"
        )
    return sources[0], targets[0]


def add_bundles(
    root: Path,
    bundles: Sequence[Path],
    *,
    channel: str | None = None,
    basis_points: int = BASIS_POINTS,
    signing: SigningPlan | None = None,
    clock: Clock = time.time,
) -> tuple[list[Added], VerifiedIndex]:
    """Verify and add full and delta bundles, promote new releases to `channel`, publish.

    Nothing is published unless every bundle was accepted: a refused bundle leaves the
    repository as it was (files already copied are removed).
    """
    with repository_lock(root):
        settings = load_settings(root)
        catalog = load_catalog(root)
        if settings.bundle_keyring is None:
            raise RepositoryError(
                f"{settings.path}: [bundles] keyring: missing (every added bundle must verify "
                "with it)"
            )
        keyring = load_keyring(settings.bundle_keyring)
        bundle_dir = public_root(settings.root) / "bundles"
        added: list[Added] = []
        placed: list[Path] = []
        try:
            for source in bundles:
                entry, catalog = _add_one(
                    source, bundle_dir, keyring, catalog, int(clock()), placed
                )
                added.append(entry)
            if channel is not None:
                for entry in added:
                    if entry.kind == "release":
                        catalog = _promote(
                            catalog,
                            entry.version,
                            channel,
                            basis_points,
                            narrow=False,
                            now=int(clock()),
                        )
            with open_index_signers(_signing(settings, signing)) as signers:
                verified = publish_index(settings, catalog, signers, clock)
        except BaseException:
            for path in placed:
                path.unlink(missing_ok=True)
            raise
        return added, verified


def _add_one(
    source: Path,
    bundle_dir: Path,
    keyring: Keyring,
    catalog: Catalog,
    now: int,
    placed: list[Path],
) -> tuple[Added, Catalog]:
    if not source.is_file():
        raise RepositoryError(f"{source}: no such file")
    temporary = temporary_name(bundle_dir / "incoming.avb")
    sha256, size = _copy_hashing(source, temporary)
    try:
        manifest = _verified_manifest(temporary, source, keyring)
        if manifest.type is BundleType.FULL:
            entry, catalog = _add_release(source, manifest, catalog, sha256, size, now)
        else:
            entry, catalog = _add_delta(source, manifest, catalog, sha256, size, now)
        if entry.new:
            final = bundle_dir / f"{sha256}.avb"
            temporary.replace(final)
            placed.append(final)
            sync_directory(bundle_dir)
        return entry, catalog
    finally:
        temporary.unlink(missing_ok=True)


def _add_release(
    source: Path, manifest: Manifest, catalog: Catalog, sha256: str, size: int, now: int
) -> tuple[Added, Catalog]:
    def result(new: bool) -> Added:
        return Added(source, "release", manifest.version, manifest.compatible, sha256, new)

    if catalog.release_by_sha256(sha256) is not None:
        return result(False), catalog
    for other in catalog.releases_of(manifest.version):
        if other.compatible == manifest.compatible:
            raise RepositoryError(
                f"{source}: the repository already holds a different bundle of version "
                f"{manifest.version} for {manifest.compatible} (sha256 {other.sha256}); a "
                "published release never changes, give the new build a new version"
            )
    release = CatalogRelease(
        product=manifest.name,
        version=manifest.version,
        compatible=manifest.compatible,
        security_version=manifest.policy.security_version or 0,
        size=size,
        sha256=sha256,
        added=now,
        images=_images(manifest),
    )
    return result(True), replace(catalog, releases=(*catalog.releases, release))


def _add_delta(
    source: Path, manifest: Manifest, catalog: Catalog, sha256: str, size: int, now: int
) -> tuple[Added, Catalog]:
    old, new = _delta_ends(manifest, catalog, source)

    def result(fresh: bool) -> Added:
        return Added(source, "delta", new.version, new.compatible, sha256, fresh, old.version)

    if catalog.delta_for(old.sha256, new.sha256) is not None:
        # Content-addressed by the pair of full bundles: a pair is published once.
        return result(False), catalog
    for other in catalog.deltas:
        if (other.from_version, other.to_version) == (old.version, new.version) and (
            catalog.release_by_sha256(other.to_bundle) or new
        ).compatible == new.compatible:
            raise RepositoryError(
                f"{source}: the repository already has a delta from {old.version} to "
                f"{new.version} for {new.compatible} made from other bundles"
            )
    delta = CatalogDelta(
        compatible=new.compatible,
        from_version=old.version,
        to_version=new.version,
        size=size,
        sha256=sha256,
        from_bundle=old.sha256,
        to_bundle=new.sha256,
        added=now,
    )
    return result(True), replace(catalog, deltas=(*catalog.deltas, delta))


# --- promoting ---------------------------------------------------------------------------------


def _promote(
    catalog: Catalog,
    version: str,
    channel_name: str,
    basis_points: int,
    *,
    narrow: bool,
    now: int,
) -> Catalog:
    check_channel(channel_name)
    if not catalog.releases_of(version):
        known = ", ".join(dict.fromkeys(r.version for r in catalog.releases)) or "none"
        raise RepositoryError(f"version {version!r}: not in the repository (releases: {known})")
    if not 0 <= basis_points <= BASIS_POINTS:
        raise RepositoryError(f"percent: expected 0 to 100, got {basis_points / 100}")
    channel = catalog.channel(channel_name) or Channel(channel_name, ())
    current = channel.rollout(version)
    if current is None:
        rollouts = (CatalogRollout(version, basis_points, now), *channel.rollouts)
    else:
        if basis_points < current.basis_points and not narrow:
            raise RepositoryError(
                f"{version} is offered to {current.basis_points / 100:g} % of channel "
                f"{channel_name}; narrowing to {basis_points / 100:g} % stops offering it to "
                "devices that were offered it (give --narrow to do so)"
            )
        rollouts = tuple(
            replace(r, basis_points=basis_points, promoted=now) if r.version == version else r
            for r in channel.rollouts
        )
    return catalog.with_channel(Channel(channel_name, rollouts))


def promote(
    root: Path,
    version: str,
    channel: str,
    basis_points: int = BASIS_POINTS,
    *,
    narrow: bool = False,
    signing: SigningPlan | None = None,
    clock: Clock = time.time,
) -> VerifiedIndex:
    """Offer `version` in `channel` to `basis_points`/10000 of the devices, and publish."""
    with repository_lock(root):
        settings = load_settings(root)
        catalog = _promote(
            load_catalog(root), version, channel, basis_points, narrow=narrow, now=int(clock())
        )
        with open_index_signers(_signing(settings, signing)) as signers:
            return publish_index(settings, catalog, signers, clock)


# --- status ------------------------------------------------------------------------------------


def repository_status(root: Path, *, verify_files: bool = False) -> dict[str, Any]:
    """What the repository holds and what its published index says, as plain data."""
    settings = load_settings(root)
    catalog = load_catalog(root)
    status: dict[str, Any] = {"repository": settings.name, "root": str(settings.root)}
    try:
        verified = read_index(root)
        index = verified.index
        status["index"] = {
            "serial": index.serial,
            "issued": index.issued,
            "expires": index.expires,
            "sha256": verified.sha256,
            "signers": list(verified.signers),
        }
    except (IndexRefused, RepositoryError) as error:
        status["index"] = {"error": str(error)}
    rollouts: dict[str, dict[str, float]] = {}
    for channel in catalog.channels:
        for rollout in channel.rollouts:
            rollouts.setdefault(rollout.version, {})[channel.name] = rollout.basis_points / 100
    status["releases"] = [
        {
            "product": r.product,
            "version": r.version,
            "compatible": r.compatible,
            "security_version": r.security_version,
            "size": r.size,
            "sha256": r.sha256,
            "path": bundle_path(r.sha256),
            "channels": rollouts.get(r.version, {}),
        }
        for r in catalog.releases
    ]
    status["deltas"] = [
        {
            "compatible": d.compatible,
            "from": d.from_version,
            "to": d.to_version,
            "size": d.size,
            "sha256": d.sha256,
            "path": bundle_path(d.sha256),
        }
        for d in catalog.deltas
    ]
    status["channels"] = {
        channel.name: [
            {"version": r.version, "percent": r.basis_points / 100, "promoted": r.promoted}
            for r in channel.rollouts
        ]
        for channel in catalog.channels
    }
    if verify_files:
        status["problems"] = check_files(settings.root, catalog)
    return status


def check_files(root: Path, catalog: Catalog) -> list[str]:
    """Every bundle file the catalog names, hashed: the problems found (empty when sound)."""
    problems = []
    entries: list[tuple[str, int]] = [(r.sha256, r.size) for r in catalog.releases]
    entries += [(d.sha256, d.size) for d in catalog.deltas]
    for sha256, size in entries:
        path = public_root(root) / bundle_path(sha256)
        try:
            with path.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            actual = path.stat().st_size
        except OSError as error:
            problems.append(f"{path}: {error.strerror}")
            continue
        if actual != size or digest != sha256:
            problems.append(
                f"{path}: {actual} bytes with sha256 {digest}; the catalog says {size} bytes "
                f"with sha256 {sha256}"
            )
    return problems
