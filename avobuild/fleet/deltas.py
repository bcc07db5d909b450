"""`repo deltas`: deltas from the previous releases of each compatible string to the newest.

A pair is named by the sha256 of its two full bundles, and the catalog records that address
for every delta it holds, so a pair is never built twice, whoever built it (this command,
or a CI job running `repo deltas --pair` whose result came back through `repo add`).
`plan_deltas` is what `--plan` prints, so a CI engine can fan the pairs out itself;
`build_deltas` runs the pairs here, one process per pair up to the number of cores (the
delta encoder and the bundle writer are CPU-bound, and a process pool sidesteps the GIL),
splitting the cores among the processes for their own compression threads.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from avobuild.bundle.keys import load_keyring
from avobuild.bundle.signing import SigningPlan
from avobuild.delta.bundles import create_delta_bundle
from avobuild.fleet.catalog import Catalog, CatalogRelease
from avobuild.fleet.errors import RepositoryError
from avobuild.fleet.index import bundle_path
from avobuild.fleet.repository import public_root
from avobuild.fleet.settings import Settings


@dataclass(frozen=True)
class DeltaPair:
    """One delta to build: from one full bundle to another of the same compatible string."""

    compatible: str
    from_version: str
    to_version: str
    from_bundle: str
    to_bundle: str

    def as_json(self) -> dict[str, str]:
        return {
            "compatible": self.compatible,
            "from": self.from_version,
            "to": self.to_version,
            "from_bundle": self.from_bundle,
            "to_bundle": self.to_bundle,
            "pair": f"{self.from_version}:{self.to_version}",
        }


@dataclass(frozen=True)
class BuiltDelta:
    pair: DeltaPair
    path: Path
    full_size: int
    delta_size: int


def plan_deltas(catalog: Catalog, previous: int) -> list[DeltaPair]:
    """For each compatible string, the newest release (the last added) and the `previous`
    releases before it; the pairs the catalog does not hold yet, newest source first."""
    by_compatible: dict[str, list[CatalogRelease]] = {}
    for release in catalog.releases:
        by_compatible.setdefault(release.compatible, []).append(release)
    pairs = []
    for compatible, releases in by_compatible.items():
        newest = releases[-1]
        for old in reversed(releases[:-1][-previous:] if previous else []):
            if catalog.delta_for(old.sha256, newest.sha256) is None:
                pairs.append(
                    DeltaPair(compatible, old.version, newest.version, old.sha256, newest.sha256)
                )
    return pairs


def find_pair(catalog: Catalog, text: str, compatible: str | None = None) -> DeltaPair:
    """The pair `FROM:TO` of `--pair` (with `compatible` when a version is ambiguous)."""
    from_version, sep, to_version = text.partition(":")
    if not sep or not from_version or not to_version:
        raise RepositoryError(f"--pair {text!r}: expected FROM:TO, e.g. 1.0.0:1.1.0")

    def one(version: str) -> CatalogRelease:
        candidates = [
            release
            for release in catalog.releases_of(version)
            if compatible is None or release.compatible == compatible
        ]
        if not candidates:
            raise RepositoryError(f"--pair {text!r}: no release {version} in the repository")
        if len(candidates) > 1:
            names = ", ".join(release.compatible for release in candidates)
            raise RepositoryError(
                f"--pair {text!r}: version {version} exists for {names}; give --compatible"
            )
        return candidates[0]

    old, new = one(from_version), one(to_version)
    if old.compatible != new.compatible:
        raise RepositoryError(
            f"--pair {text!r}: {from_version} is for {old.compatible}, {to_version} for "
            f"{new.compatible}"
        )
    return DeltaPair(new.compatible, old.version, new.version, old.sha256, new.sha256)


@dataclass(frozen=True)
class _Job:
    public: Path
    pair: DeltaPair
    output: Path
    key: Path
    keyring: Path
    level: int
    threads: int


def _build(job: _Job) -> BuiltDelta:
    """One pair, in a worker process: keys are loaded here (they do not pickle)."""
    plan = SigningPlan(keys=(job.key,))
    with (
        tempfile.TemporaryDirectory(prefix="avobuild-delta-") as work,
        plan.open_material() as signing,
    ):
        result = create_delta_bundle(
            job.public / bundle_path(job.pair.from_bundle),
            job.public / bundle_path(job.pair.to_bundle),
            job.output,
            Path(work),
            signing=signing,
            keyring=load_keyring(job.keyring),
            level=job.level,
            threads=job.threads,
        )
    return BuiltDelta(job.pair, job.output, result.full_size, result.delta_size)


def delta_key(settings: Settings, key: Path | None) -> Path:
    chosen = key or settings.deltas.key
    if chosen is None:
        raise RepositoryError(
            f"no key to sign deltas with: give --key or set [deltas] key in {settings.path}"
        )
    return chosen


def build_deltas(
    settings: Settings,
    pairs: Sequence[DeltaPair],
    outputs: Sequence[Path],
    *,
    key: Path,
    jobs: int | None = None,
    level: int | None = None,
    done: Callable[[BuiltDelta], None] | None = None,
) -> list[BuiltDelta]:
    """Build every pair into its output path, in parallel; the results in pair order."""
    if settings.bundle_keyring is None:
        raise RepositoryError(f"{settings.path}: [bundles] keyring: missing")
    if not pairs:
        return []
    cores = os.cpu_count() or 1
    workers = max(1, min(len(pairs), jobs or cores))
    threads = max(1, cores // workers)
    work = [
        _Job(
            public_root(settings.root),
            pair,
            output,
            key,
            settings.bundle_keyring,
            level or settings.deltas.level,
            threads,
        )
        for pair, output in zip(pairs, outputs, strict=True)
    ]
    if workers == 1:
        results = []
        for job in work:
            results.append(_build(job))
            if done is not None:
                done(results[-1])
        return results
    # spawn, not fork: the parent may hold compression threads a fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        results = []
        for result in pool.map(_build, work):
            results.append(result)
            if done is not None:
                done(result)
        return results
