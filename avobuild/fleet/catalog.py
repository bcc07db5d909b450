"""`catalog.toml`: what a repository holds, from which the signed index is rendered.

The catalog is avobuild's own record (people read it, `avobuild repo` writes it): every
release with the hashes of its images (so a delta bundle built elsewhere can be matched to
the two releases it joins), every delta with the two full bundles it was made from (the
content address that keeps a pair from being built twice), the channels' rollouts newest
promotion first, and the serial of the last index. Written with tomli-w, read back strictly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w

from avobuild.errors import RecipeError
from avobuild.fleet.errors import RepositoryError
from avobuild.fleet.index import (
    BASIS_POINTS,
    CHANNEL,
    CHANNEL_GRAMMAR,
    IDENTIFIER,
    IDENTIFIER_GRAMMAR,
    PATTERN,
    PATTERN_GRAMMAR,
    SHA256,
)
from avobuild.model.tomlcheck import Table, load_toml

CATALOG_FILE = "catalog.toml"
CATALOG_FORMAT = 1


@dataclass(frozen=True)
class ImageHash:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CatalogRelease:
    """A full bundle in the repository."""

    product: str
    version: str
    compatible: str
    security_version: int
    size: int
    sha256: str
    added: int
    images: tuple[ImageHash, ...]

    def image(self, name: str) -> ImageHash | None:
        return next((image for image in self.images if image.name == name), None)


@dataclass(frozen=True)
class CatalogDelta:
    """A delta bundle, and the full bundles (by sha256) it turns one into the other."""

    compatible: str
    from_version: str
    to_version: str
    size: int
    sha256: str
    from_bundle: str
    to_bundle: str
    added: int


@dataclass(frozen=True)
class CatalogRollout:
    version: str
    basis_points: int
    promoted: int


@dataclass(frozen=True)
class Channel:
    name: str
    rollouts: tuple[CatalogRollout, ...]  # the newest promotion first

    def rollout(self, version: str) -> CatalogRollout | None:
        return next((r for r in self.rollouts if r.version == version), None)


@dataclass(frozen=True)
class Catalog:
    serial: int = 0
    releases: tuple[CatalogRelease, ...] = ()  # in the order they were added
    deltas: tuple[CatalogDelta, ...] = ()
    channels: tuple[Channel, ...] = ()

    def releases_of(self, version: str) -> tuple[CatalogRelease, ...]:
        return tuple(release for release in self.releases if release.version == version)

    def release_by_sha256(self, sha256: str) -> CatalogRelease | None:
        return next((r for r in self.releases if r.sha256 == sha256), None)

    def delta_for(self, from_bundle: str, to_bundle: str) -> CatalogDelta | None:
        return next(
            (d for d in self.deltas if d.from_bundle == from_bundle and d.to_bundle == to_bundle),
            None,
        )

    def channel(self, name: str) -> Channel | None:
        return next((channel for channel in self.channels if channel.name == name), None)

    def with_channel(self, channel: Channel) -> Catalog:
        others = [c for c in self.channels if c.name != channel.name]
        channels = sorted([*others, channel], key=lambda c: c.name.encode())
        return replace(self, channels=tuple(channels))


def load_catalog(root: Path) -> Catalog:
    path = root / CATALOG_FILE
    if not path.is_file():
        raise RepositoryError(f"{path}: no such file; is {root} an update repository?")
    try:
        return _parse(load_toml(path))
    except RecipeError as error:
        raise RepositoryError(str(error)) from None


def _string(table: Table, key: str, pattern: Any, grammar: str) -> str:
    return table.string(key, pattern=pattern, what=f"a string matching {grammar}")


def _sha(table: Table, key: str) -> str:
    return table.string(key, pattern=SHA256, what="64 lowercase hex digits (sha256)")


def _parse(table: Table) -> Catalog:
    version = table.integer("format", minimum=1)
    if version != CATALOG_FORMAT:
        table.fail("format", str(CATALOG_FORMAT), version)
    serial = table.integer("serial", minimum=0)
    releases = []
    for entry in table.array_of_tables("release"):
        images = []
        for name, image in entry.subtables("images"):
            images.append(ImageHash(name, image.integer("size"), _sha(image, "sha256")))
            image.check_unknown()
        releases.append(
            CatalogRelease(
                product=_string(entry, "product", IDENTIFIER, IDENTIFIER_GRAMMAR),
                version=_string(entry, "version", IDENTIFIER, IDENTIFIER_GRAMMAR),
                compatible=_string(entry, "compatible", PATTERN, PATTERN_GRAMMAR),
                security_version=entry.integer("security-version"),
                size=entry.integer("size"),
                sha256=_sha(entry, "sha256"),
                added=entry.integer("added"),
                images=tuple(images),
            )
        )
        entry.check_unknown()
    deltas = []
    for entry in table.array_of_tables("delta"):
        deltas.append(
            CatalogDelta(
                compatible=_string(entry, "compatible", PATTERN, PATTERN_GRAMMAR),
                from_version=_string(entry, "from", IDENTIFIER, IDENTIFIER_GRAMMAR),
                to_version=_string(entry, "to", IDENTIFIER, IDENTIFIER_GRAMMAR),
                size=entry.integer("size"),
                sha256=_sha(entry, "sha256"),
                from_bundle=_sha(entry, "from-bundle"),
                to_bundle=_sha(entry, "to-bundle"),
                added=entry.integer("added"),
            )
        )
        entry.check_unknown()
    channels = []
    for name, channel in table.subtables("channel"):
        if not CHANNEL.fullmatch(name):
            raise RecipeError(f"{table.path}: [channel.{name}]: names match {CHANNEL_GRAMMAR}")
        rollouts = []
        for entry in channel.array_of_tables("rollouts"):
            points = entry.integer("basis-points")
            if points > BASIS_POINTS:
                entry.fail("basis-points", f"0 to {BASIS_POINTS}", points)
            rollouts.append(
                CatalogRollout(
                    _string(entry, "version", IDENTIFIER, IDENTIFIER_GRAMMAR),
                    points,
                    entry.integer("promoted"),
                )
            )
            entry.check_unknown()
        channel.check_unknown()
        channels.append(Channel(name, tuple(rollouts)))
    table.check_unknown()
    return Catalog(serial, tuple(releases), tuple(deltas), tuple(channels))


def catalog_document(catalog: Catalog) -> dict[str, Any]:
    document: dict[str, Any] = {"format": CATALOG_FORMAT, "serial": catalog.serial}
    if catalog.releases:
        document["release"] = [
            {
                "product": r.product,
                "version": r.version,
                "compatible": r.compatible,
                "security-version": r.security_version,
                "size": r.size,
                "sha256": r.sha256,
                "added": r.added,
                "images": {i.name: {"size": i.size, "sha256": i.sha256} for i in r.images},
            }
            for r in catalog.releases
        ]
    if catalog.deltas:
        document["delta"] = [
            {
                "compatible": d.compatible,
                "from": d.from_version,
                "to": d.to_version,
                "size": d.size,
                "sha256": d.sha256,
                "from-bundle": d.from_bundle,
                "to-bundle": d.to_bundle,
                "added": d.added,
            }
            for d in catalog.deltas
        ]
    if catalog.channels:
        document["channel"] = {
            channel.name: {
                "rollouts": [
                    {"version": r.version, "basis-points": r.basis_points, "promoted": r.promoted}
                    for r in channel.rollouts
                ]
            }
            for channel in catalog.channels
        }
    return document


def render_catalog(catalog: Catalog) -> bytes:
    return tomli_w.dumps(catalog_document(catalog)).encode()
