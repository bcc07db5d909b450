"""The signed repository index: what a device reads to learn which updates exist.

Specified in docs/repository-format.md. The file is framed like a bundle (a fixed header
giving two sizes, the body, the bundle format's signature block) and the body is line-based
ASCII in the manifest's style, so busybox `sh` and `openssl` verify and parse it: fields
separated by one space, one canonical spelling, counts and sizes bounded before anything is
read, and every line a reader does not know refused (a skipped line could hide a rollout
or a release).

This module is also the reference verifier the tests hold the device side to:
`read_signed_index` refuses exactly what a device must refuse (bad framing, a signature
threshold not met, a repository name that is not the device's, a serial older than the last
one accepted, an expired index), in that order, and parses the body only after the
signatures over its exact bytes verified.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from avobuild.fleet.errors import IndexRefused
from avobuild.fleet.signing import (
    MAX_SIGNATURE_BLOCK_SIZE,
    Keyring,
    verify_index_block,
)

MAGIC = b"AVOINDEX"
FORMAT_VERSION = 1
HEADER_SIZE = 33
BODY_VERSION = 1
MAX_BODY_SIZE = 1 << 20
MAX_RELEASES = 1000
MAX_DELTAS = 4000
MAX_ROLLOUTS = 1000
MAX_CHANNELS = 64
BASIS_POINTS = 10000
# Numbers have at most 18 digits, so a 64-bit shell holds them without a range check.
MAX_DECIMAL = 10**18 - 1

_HEADER = re.compile(rb"AVOINDEX ([0-9]) ([0-9]{10}) ([0-9]{10})\n")
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~:@-]{0,127}", re.ASCII)
PATTERN = re.compile(r"[A-Za-z0-9*?][A-Za-z0-9._+~:@*?-]{0,127}", re.ASCII)
CHANNEL = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}", re.ASCII)
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,17}", re.ASCII)
SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)

IDENTIFIER_GRAMMAR = "[A-Za-z0-9][A-Za-z0-9._+~:@-]{0,127}"
PATTERN_GRAMMAR = "[A-Za-z0-9*?][A-Za-z0-9._+~:@*?-]{0,127}"
CHANNEL_GRAMMAR = "[a-z0-9][a-z0-9_-]{0,31}"


@dataclass(frozen=True)
class IndexRelease:
    """A full bundle: the device family it is for, its version, policy floor and file."""

    compatible: str
    version: str
    security_version: int
    size: int
    sha256: str

    @property
    def path(self) -> str:
        """Where the bundle lives, relative to the repository's public root."""
        return bundle_path(self.sha256)

    def matches(self, compatible: str) -> bool:
        """True if a device whose compatible string is `compatible` may install it."""
        return compatible_matches(self.compatible, compatible)


@dataclass(frozen=True)
class IndexDelta:
    """A delta bundle from `from_version` to the release (`compatible`, `to_version`)."""

    compatible: str
    from_version: str
    to_version: str
    size: int
    sha256: str

    @property
    def path(self) -> str:
        return bundle_path(self.sha256)


@dataclass(frozen=True)
class Rollout:
    """A release offered in a channel to `basis_points` / 10000 of the devices."""

    channel: str
    version: str
    basis_points: int


@dataclass(frozen=True)
class Index:
    """A parsed index body (docs/repository-format.md, section 3)."""

    repository: str
    serial: int
    issued: int
    expires: int
    releases: tuple[IndexRelease, ...] = ()
    deltas: tuple[IndexDelta, ...] = ()
    rollouts: tuple[Rollout, ...] = ()

    def release(self, version: str, compatible: str) -> IndexRelease | None:
        """The release of `version` a device with `compatible` may install (the first line
        whose pattern matches, in index order)."""
        return next(
            (r for r in self.releases if r.version == version and r.matches(compatible)), None
        )

    def delta(self, compatible: str, from_version: str, to_version: str) -> IndexDelta | None:
        """The delta a device with `compatible` running `from_version` may use to reach
        `to_version`."""
        return next(
            (
                d
                for d in self.deltas
                if d.from_version == from_version
                and d.to_version == to_version
                and compatible_matches(d.compatible, compatible)
            ),
            None,
        )

    def channel(self, channel: str) -> tuple[Rollout, ...]:
        """The channel's rollouts in precedence order (the newest promotion first)."""
        return tuple(rollout for rollout in self.rollouts if rollout.channel == channel)

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(rollout.channel for rollout in self.rollouts))

    def file(self, sha256: str) -> IndexRelease | IndexDelta | None:
        """The release or delta whose bundle has this sha256."""
        release = next((r for r in self.releases if r.sha256 == sha256), None)
        if release is not None:
            return release
        return next((d for d in self.deltas if d.sha256 == sha256), None)


@dataclass(frozen=True)
class VerifiedIndex:
    """An index whose signatures, repository, serial and expiry were checked."""

    index: Index
    signers: tuple[str, ...]
    sha256: str
    data: bytes


def bundle_path(sha256: str) -> str:
    return f"bundles/{sha256}.avb"


def compatible_matches(pattern: str, compatible: str) -> bool:
    """`*` any run of characters, `?` one: POSIX sh `case`; no other pattern characters exist
    in the grammar, so fnmatch's `[` classes can never occur."""
    return fnmatch.fnmatchcase(compatible, pattern)


# --- checks shared by the parser and by writers validating user input ------------------------


def check_identifier(field: str, value: str) -> str:
    if not IDENTIFIER.fullmatch(value):
        raise IndexRefused(
            f"{field}: expected 1-128 characters matching {IDENTIFIER_GRAMMAR}, got {value!r}"
        )
    return value


def check_pattern(field: str, value: str) -> str:
    if not PATTERN.fullmatch(value):
        raise IndexRefused(
            f"{field}: expected 1-128 characters matching {PATTERN_GRAMMAR}, got {value!r}"
        )
    return value


def check_channel(value: str) -> str:
    if not CHANNEL.fullmatch(value):
        raise IndexRefused(
            f"channel: expected 1-32 characters matching {CHANNEL_GRAMMAR}, got {value!r}"
        )
    return value


def _number(field: str, text: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise IndexRefused(
            f"{field}: expected a decimal number of at most 18 digits without leading zeros, "
            f"got {text[:40]!r}"
        )
    return int(text)


def _sha256(field: str, text: str) -> str:
    if not SHA256.fullmatch(text):
        raise IndexRefused(f"{field}: expected 64 lowercase hex digits (sha256), got {text!r}")
    return text


# --- the body ----------------------------------------------------------------------------------


def render_index(index: Index) -> bytes:
    """The canonical body bytes of `index`; IndexRefused if it breaks a rule of the format
    (a writer refuses exactly what a reader would)."""
    lines = [
        f"avobuild-index {BODY_VERSION}",
        f"repository {index.repository}",
        f"serial {index.serial}",
        f"issued {index.issued}",
        f"expires {index.expires}",
    ]
    lines.extend(
        f"release {r.compatible} {r.version} {r.security_version} {r.size} {r.sha256}"
        for r in index.releases
    )
    lines.extend(
        f"delta {d.compatible} {d.from_version} {d.to_version} {d.size} {d.sha256}"
        for d in index.deltas
    )
    lines.extend(f"rollout {r.channel} {r.version} {r.basis_points}" for r in index.rollouts)
    body = "".join(line + "\n" for line in lines).encode("ascii")
    if len(body) > MAX_BODY_SIZE:
        raise IndexRefused(
            f"index body: {len(body)} bytes, over the limit of {MAX_BODY_SIZE}; remove old "
            "releases or deltas from the repository"
        )
    if parse_index_body(body) != index:
        raise IndexRefused("index: does not survive a render/parse round trip")
    return body


def sort_releases(releases: Sequence[IndexRelease]) -> tuple[IndexRelease, ...]:
    """Releases in the index's canonical order: by compatible, then version (bytewise)."""
    return tuple(sorted(releases, key=lambda r: (r.compatible.encode(), r.version.encode())))


def sort_deltas(deltas: Sequence[IndexDelta]) -> tuple[IndexDelta, ...]:
    return tuple(
        sorted(
            deltas,
            key=lambda d: (d.compatible.encode(), d.from_version.encode(), d.to_version.encode()),
        )
    )


class _Lines:
    def __init__(self, text: str) -> None:
        self._lines = text[:-1].split("\n")
        self.number = 0

    def __bool__(self) -> bool:
        return self.number < len(self._lines)

    def next(self) -> list[str]:
        line = self._lines[self.number]
        self.number += 1
        if not line:
            raise IndexRefused("empty line")
        fields = line.split(" ")
        if "" in fields:
            raise IndexRefused("fields must be separated by exactly one space, none at the ends")
        return fields

    def peek(self) -> str | None:
        if not self:
            return None
        return self._lines[self.number].split(" ", 1)[0]

    def expect(self, keyword: str, count: int) -> list[str]:
        if not self:
            raise IndexRefused(f"the body ends before the '{keyword}' line")
        fields = self.next()
        if fields[0] != keyword:
            raise IndexRefused(f"expected '{keyword}', got {fields[0][:40]!r}")
        if len(fields) != count + 1:
            raise IndexRefused(f"{keyword}: expected {count} value(s), got {len(fields) - 1}")
        return fields[1:]


def parse_index_body(data: bytes, name: str = "index") -> Index:
    """Parse body bytes strictly; IndexRefused naming `name` and the line number."""
    if not 1 <= len(data) <= MAX_BODY_SIZE:
        raise IndexRefused(f"{name}: body of {len(data)} bytes, expected 1 to {MAX_BODY_SIZE}")
    bad = re.search(rb"[^\x20-\x7e\n]", data)
    if bad is not None:
        number = data.count(b"\n", 0, bad.start()) + 1
        raise IndexRefused(
            f"{name}: line {number}: byte 0x{data[bad.start()]:02x} is not printable ASCII"
        )
    text = data.decode("ascii")
    if not text.endswith("\n"):
        raise IndexRefused(f"{name}: the last line is not terminated by a newline")
    lines = _Lines(text)
    try:
        return _parse_lines(lines)
    except IndexRefused as error:
        raise IndexRefused(f"{name}: line {lines.number}: {error}") from None


def _parse_lines(lines: _Lines) -> Index:
    (version,) = lines.expect("avobuild-index", 1)
    if version != str(BODY_VERSION):
        raise IndexRefused(
            f"unsupported index version {version!r} (this reader implements {BODY_VERSION})"
        )
    (repository,) = lines.expect("repository", 1)
    check_identifier("repository", repository)
    serial = _number("serial", lines.expect("serial", 1)[0])
    if serial < 1:
        raise IndexRefused("serial: expected 1 or more")
    issued = _number("issued", lines.expect("issued", 1)[0])
    expires = _number("expires", lines.expect("expires", 1)[0])
    if expires <= issued:
        raise IndexRefused(f"expires: {expires} is not after issued {issued}")
    releases = _parse_releases(lines)
    deltas = _parse_deltas(lines, releases)
    rollouts = _parse_rollouts(lines, releases)
    if lines:
        keyword = lines.next()[0]
        raise IndexRefused(
            f"unexpected {keyword[:40]!r} line (lines come in the order "
            "release, delta, rollout; unknown lines are refused)"
        )
    return Index(repository, serial, issued, expires, releases, deltas, rollouts)


def _parse_releases(lines: _Lines) -> tuple[IndexRelease, ...]:
    releases: list[IndexRelease] = []
    files: set[str] = set()
    while lines.peek() == "release":
        if len(releases) == MAX_RELEASES:
            raise IndexRefused(f"more than {MAX_RELEASES} release lines")
        compatible, version, security, size, sha256 = lines.expect("release", 5)
        release = IndexRelease(
            check_pattern("release: compatible", compatible),
            check_identifier("release: version", version),
            _number("release: security-version", security),
            _number("release: size", size),
            _sha256("release: sha256", sha256),
        )
        if releases and (releases[-1].compatible.encode(), releases[-1].version.encode()) >= (
            compatible.encode(),
            version.encode(),
        ):
            raise IndexRefused(
                "release lines must be sorted by compatible, then version, each pair once"
            )
        if sha256 in files:
            raise IndexRefused(f"release: the bundle {sha256} is listed twice")
        files.add(sha256)
        releases.append(release)
    return tuple(releases)


def _parse_deltas(lines: _Lines, releases: tuple[IndexRelease, ...]) -> tuple[IndexDelta, ...]:
    deltas: list[IndexDelta] = []
    files = {release.sha256 for release in releases}
    targets = {(release.compatible, release.version) for release in releases}
    while lines.peek() == "delta":
        if len(deltas) == MAX_DELTAS:
            raise IndexRefused(f"more than {MAX_DELTAS} delta lines")
        compatible, from_version, to_version, size, sha256 = lines.expect("delta", 5)
        delta = IndexDelta(
            check_pattern("delta: compatible", compatible),
            check_identifier("delta: from-version", from_version),
            check_identifier("delta: to-version", to_version),
            _number("delta: size", size),
            _sha256("delta: sha256", sha256),
        )
        if from_version == to_version:
            raise IndexRefused(f"delta: from-version and to-version are both {to_version!r}")
        if (compatible, to_version) not in targets:
            raise IndexRefused(
                f"delta: no release line for compatible {compatible!r} version {to_version!r}"
            )
        key = (compatible.encode(), from_version.encode(), to_version.encode())
        if deltas:
            last = deltas[-1]
            if (
                last.compatible.encode(),
                last.from_version.encode(),
                last.to_version.encode(),
            ) >= key:
                raise IndexRefused(
                    "delta lines must be sorted by compatible, from-version, then to-version, "
                    "each once"
                )
        if sha256 in files:
            raise IndexRefused(f"delta: the bundle {sha256} is listed twice")
        files.add(sha256)
        deltas.append(delta)
    return tuple(deltas)


def _parse_rollouts(lines: _Lines, releases: tuple[IndexRelease, ...]) -> tuple[Rollout, ...]:
    rollouts: list[Rollout] = []
    versions = {release.version for release in releases}
    channels: list[str] = []
    in_channel: set[str] = set()
    while lines.peek() == "rollout":
        if len(rollouts) == MAX_ROLLOUTS:
            raise IndexRefused(f"more than {MAX_ROLLOUTS} rollout lines")
        channel, version, basis_points = lines.expect("rollout", 3)
        check_channel(channel)
        check_identifier("rollout: version", version)
        points = _number("rollout: basis-points", basis_points)
        if points > BASIS_POINTS:
            raise IndexRefused(f"rollout: basis-points {points} is over {BASIS_POINTS} (100 %)")
        if version not in versions:
            raise IndexRefused(f"rollout: no release line has version {version!r}")
        if not channels or channels[-1] != channel:
            if channels and channels[-1].encode() >= channel.encode():
                raise IndexRefused(
                    "rollout lines must be grouped by channel, channels in ascending order"
                )
            if len(channels) == MAX_CHANNELS:
                raise IndexRefused(f"more than {MAX_CHANNELS} channels")
            channels.append(channel)
            in_channel = set()
        if version in in_channel:
            raise IndexRefused(f"rollout: version {version!r} twice in channel {channel!r}")
        in_channel.add(version)
        rollouts.append(Rollout(channel, version, points))
    return tuple(rollouts)


# --- the signed file ---------------------------------------------------------------------------


def render_header(body_size: int, block_size: int) -> bytes:
    return b"%s %d %010d %010d\n" % (MAGIC, FORMAT_VERSION, body_size, block_size)


def frame_index(body: bytes, block: bytes) -> bytes:
    """The signed index file: header, body, signature block."""
    return render_header(len(body), len(block)) + body + block


def split_signed_index(data: bytes, name: str = "index") -> tuple[bytes, bytes]:
    """The body and the signature block of a signed index file; IndexRefused on bad framing."""
    header = data[:HEADER_SIZE]
    match = _HEADER.fullmatch(header)
    if not header.startswith(MAGIC + b" "):
        raise IndexRefused(f"{name}: not an avobuild index (it does not start with 'AVOINDEX ')")
    if match is None:
        raise IndexRefused(
            f"{name}: malformed header: expected 'AVOINDEX 1 MMMMMMMMMM SSSSSSSSSS' and a newline"
        )
    if int(match.group(1)) != FORMAT_VERSION:
        raise IndexRefused(
            f"{name}: unsupported index format version {match.group(1).decode()} "
            f"(this reader implements {FORMAT_VERSION})"
        )
    body_size, block_size = int(match.group(2)), int(match.group(3))
    if not 1 <= body_size <= MAX_BODY_SIZE:
        raise IndexRefused(f"{name}: body size {body_size} out of bounds (1 to {MAX_BODY_SIZE})")
    if not 1 <= block_size <= MAX_SIGNATURE_BLOCK_SIZE:
        raise IndexRefused(
            f"{name}: signature block size {block_size} out of bounds "
            f"(1 to {MAX_SIGNATURE_BLOCK_SIZE})"
        )
    expected = HEADER_SIZE + body_size + block_size
    if len(data) < expected:
        raise IndexRefused(
            f"{name}: truncated at byte offset {len(data)}: the header announces {expected} bytes"
        )
    if len(data) > expected:
        raise IndexRefused(
            f"{name}: unexpected data at byte offset {expected}, after the signature block"
        )
    return data[HEADER_SIZE : HEADER_SIZE + body_size], data[HEADER_SIZE + body_size :]


def read_signed_index(
    data: bytes,
    keyring: Keyring,
    *,
    now: int,
    repository: str | None = None,
    last_serial: int | None = None,
    name: str = "index",
    allow_expired: bool = False,
) -> VerifiedIndex:
    """Verify and parse a signed index, refusing what a device must refuse (section 5).

    `allow_expired` is for a server, which keeps answering from an index it published even
    after the repository forgot to refresh it (devices still refuse it, as they must).
    """
    body, block = split_signed_index(data, name)
    signers = verify_index_block(body, block, keyring, now=now, name=name)
    index = parse_index_body(body, name)
    if repository is not None and index.repository != repository:
        raise IndexRefused(
            f"{name}: the index is for repository {index.repository!r}, expected {repository!r}"
        )
    if last_serial is not None and index.serial < last_serial:
        raise IndexRefused(
            f"{name}: serial {index.serial} is older than serial {last_serial} accepted before "
            "(a rollback to an old index)"
        )
    if now >= index.expires and not allow_expired:
        raise IndexRefused(
            f"{name}: expired at {index.expires} (now {now}); an old index replayed by a "
            "mirror or an attacker (freeze), or the repository was not refreshed"
        )
    return VerifiedIndex(index, signers, hashlib.sha256(data).hexdigest(), data)
