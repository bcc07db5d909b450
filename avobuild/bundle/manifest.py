"""The bundle manifest: the signed, line-oriented description of a bundle's images and chunks.

Specified in docs/bundle-format.md, section "Manifest". The text form is chosen so that a
POSIX sh reader can parse it with `read` and `case`: ASCII, one record per LF-terminated line,
fields separated by exactly one space. The exact bytes are what is signed, so rendering is
canonical (one spelling per manifest) and parsing is strict: anything a v1 reader does not
understand is an error, because an ignored line could change what gets installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from avobuild.errors import BundleError, shown
from avobuild.model.names import COMPATIBLE_GLOB, IDENTIFIER, IMAGE_NAME

MANIFEST_VERSION = 1
# Version 2 adds the policy lines (security-version, min-applier-version, expires), glob
# patterns in `compatible` and payload encryption. Writers emit version 1 whenever a bundle
# uses none of them, so devices that only read version 1 keep accepting it.
MANIFEST_VERSION_POLICY = 2
# Version 3 adds `compression zstd-stream`: one zstd stream per run of chunks, flushed at
# every chunk boundary, and the sha256 of every chunk's data on its chunk line (section 5.2).
MANIFEST_VERSION_STREAM = 3
SUPPORTED_MANIFEST_VERSIONS = (MANIFEST_VERSION, MANIFEST_VERSION_POLICY, MANIFEST_VERSION_STREAM)
MAX_MANIFEST_SIZE = 16 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 16 << 20
DEFAULT_CHUNK_SIZE = 1 << 20
# Largest value any decimal field may take: what a 64-bit signed shell arithmetic handles.
MAX_DECIMAL = (1 << 63) - 1
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

_IDENTIFIER = IDENTIFIER.pattern
_IMAGE_NAME = IMAGE_NAME.pattern
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
COMPATIBLE_PATTERN = _PATTERN = COMPATIBLE_GLOB.pattern
_APPLIER_VERSION = re.compile(r"(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,3}", re.ASCII)

IDENTIFIER_GRAMMAR = IDENTIFIER.text
IMAGE_NAME_GRAMMAR = IMAGE_NAME.text
PATTERN_GRAMMAR = COMPATIBLE_GLOB.text
APPLIER_VERSION_GRAMMAR = "N, N.N, N.N.N or N.N.N.N (decimal, no leading zeros)"


class BundleType(StrEnum):
    FULL = "full"
    DELTA = "delta"


@dataclass(frozen=True)
class ImageRef:
    """Size and sha256 of a whole slot image: what a delta needs, or what it produces."""

    size: int
    sha256: str


class Compression(StrEnum):
    ZSTD = "zstd"
    NONE = "none"
    ZSTD_STREAM = "zstd-stream"


# zstd-stream limits (docs/bundle-format.md 5.2): a frame spans 1 to 65536 chunks, and its
# window is 2^10 to 2^27 bytes (2^27 is what the zstd command decodes without --long).
MAX_FRAME_CHUNKS = 65536
MIN_WINDOW_LOG = 10
MAX_WINDOW_LOG = 27


@dataclass(frozen=True)
class StreamParameters:
    """How a zstd-stream payload is cut into frames: a new frame starts at every chunk whose
    index is a multiple of `frame_chunks`, and no frame's window exceeds 2^`window_log`."""

    frame_chunks: int
    window_log: int

    @property
    def window_size(self) -> int:
        return 1 << self.window_log


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk of an image as stored in the payload: its stored size and the hash of it."""

    index: int
    stored_size: int
    sha256: str
    # zstd-stream only: the sha256 of the chunk's decompressed data.
    data_sha256: str | None = None


@dataclass(frozen=True)
class ImageEntry:
    """One image: its uncompressed size and hash, and its chunks in order."""

    name: str
    size: int
    sha256: str
    chunks: tuple[ChunkEntry, ...]
    # Delta bundles only: the payload stream (size, sha256, chunks) is a delta; applied to
    # the image `source` it produces the image `target`.
    source: ImageRef | None = None
    target: ImageRef | None = None

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    @property
    def stored_size(self) -> int:
        return sum(chunk.stored_size for chunk in self.chunks)


@dataclass(frozen=True)
class Policy:
    """What a device must check before installing (manifest version 2, section 3.5).

    `security_version`: anti-rollback counter, refused when lower than the device's;
    `min_applier_version`: the oldest applier allowed to install the bundle;
    `expires`: seconds since 1970 after which the bundle must not be installed.
    """

    security_version: int | None = None
    min_applier_version: str | None = None
    expires: int | None = None

    @property
    def empty(self) -> bool:
        return self == Policy()


ENCRYPTION_ALGORITHM = "aes-256-gcm"
# Bytes an encrypted chunk stores beyond its frame: the 12-byte nonce and the 16-byte tag.
ENCRYPTION_OVERHEAD = 28


@dataclass(frozen=True)
class Encryption:
    """Payload encryption (manifest version 2): AES-256-GCM per chunk (avobuild/bundle/crypt.py).

    `key_commitment` is the sha256 commitment to the content key, so a reader can tell the
    key it unwrapped is the signer's.
    """

    key_commitment: str
    algorithm: str = ENCRYPTION_ALGORITHM


def is_pattern(compatible: str) -> bool:
    return "*" in compatible or "?" in compatible


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest (docs/bundle-format.md, section 3)."""

    name: str
    version: str
    compatible: str
    build_date: int
    chunk_size: int
    compression: Compression
    images: tuple[ImageEntry, ...]
    type: BundleType = BundleType.FULL
    policy: Policy = Policy()
    encryption: Encryption | None = None
    stream: StreamParameters | None = None

    @property
    def manifest_version(self) -> int:
        """The lowest manifest version that can express this manifest."""
        if self.compression is Compression.ZSTD_STREAM:
            return MANIFEST_VERSION_STREAM
        if not self.policy.empty or is_pattern(self.compatible) or self.encryption is not None:
            return MANIFEST_VERSION_POLICY
        return MANIFEST_VERSION

    def image(self, name: str) -> ImageEntry | None:
        return next((image for image in self.images if image.name == name), None)

    def chunk_data_size(self, image: ImageEntry, index: int) -> int:
        """Size of chunk `index` of `image` once decompressed (the last one may be short)."""
        return min(self.chunk_size, image.size - index * self.chunk_size)

    @property
    def payload_size(self) -> int:
        return sum(image.stored_size for image in self.images)

    def frames(self, image: ImageEntry) -> list[tuple[ChunkEntry, ...]]:
        """zstd-stream: the chunks of `image` grouped by the frame that holds them."""
        if self.stream is None:
            return [(chunk,) for chunk in image.chunks]
        step = self.stream.frame_chunks
        return [image.chunks[start : start + step] for start in range(0, image.chunk_count, step)]


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def max_stored_size(data_size: int, compression: Compression, encrypted: bool = False) -> int:
    """The largest stored size a chunk of `data_size` bytes may have (docs/bundle-format.md 3.3).

    zstd never expands incompressible data by more than its block headers (3 bytes per
    128 KiB block) plus an 18-byte frame header; the bound leaves ample room for that while
    still capping what a reader must buffer per chunk.
    """
    overhead = ENCRYPTION_OVERHEAD if encrypted else 0
    if compression is Compression.NONE:
        return data_size + overhead
    return data_size + (data_size >> 7) + 512 + overhead


# Field checks shared by the parser (which prefixes a line number) and by writers that
# validate user input before doing any work.


def check_identifier(field: str, value: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise BundleError(
            f"{field}: expected 1-128 characters matching {IDENTIFIER_GRAMMAR}, got {shown(value)}"
        )
    return value


def check_compatible(value: str) -> str:
    """An exact compatible string, or a glob pattern using `*` and `?` (version 2)."""
    if not _PATTERN.fullmatch(value):
        raise BundleError(
            f"compatible: expected 1-128 characters matching {PATTERN_GRAMMAR} "
            f"('*' and '?' are wildcards), got {shown(value)}"
        )
    return value


def check_applier_version(value: str) -> str:
    if not _APPLIER_VERSION.fullmatch(value):
        raise BundleError(
            f"min-applier-version: expected {APPLIER_VERSION_GRAMMAR}, got {shown(value)}"
        )
    return value


def check_policy(policy: Policy) -> Policy:
    for field, number in (
        ("security-version", policy.security_version),
        ("expires", policy.expires),
    ):
        if number is not None and not 0 <= number <= MAX_DECIMAL:
            raise BundleError(f"{field}: expected 0 to {MAX_DECIMAL}, got {number}")
    if policy.min_applier_version is not None:
        check_applier_version(policy.min_applier_version)
    return policy


def check_image_name(value: str) -> str:
    if not _IMAGE_NAME.fullmatch(value):
        raise BundleError(
            f"image name: expected 1-32 characters matching {IMAGE_NAME_GRAMMAR}, "
            f"got {shown(value)}"
        )
    return value


def check_chunk_size(value: int) -> int:
    if not (MIN_CHUNK_SIZE <= value <= MAX_CHUNK_SIZE and value & (value - 1) == 0):
        raise BundleError(
            f"chunk-size: expected a power of two between {MIN_CHUNK_SIZE} and "
            f"{MAX_CHUNK_SIZE}, got '{value}'"
        )
    return value


def check_build_date(value: int) -> int:
    if not 0 <= value <= MAX_DECIMAL:
        raise BundleError(f"build-date: expected seconds since 1970 (0 or more), got '{value}'")
    return value


def _decimal(field: str, text: str) -> int:
    if not _DECIMAL.fullmatch(text) or int(text) > MAX_DECIMAL:
        raise BundleError(
            f"{field}: expected a decimal number without leading zeros, at most {MAX_DECIMAL}, "
            f"got {shown(text)}"
        )
    return int(text)


def _sha256(field: str, text: str) -> str:
    if not _SHA256.fullmatch(text):
        raise BundleError(f"{field}: expected 64 lowercase hex digits (sha256), got {shown(text)}")
    return text


def render_manifest(manifest: Manifest) -> bytes:
    """The canonical bytes of `manifest`; raises BundleError if it breaks the grammar."""
    policy = manifest.policy
    lines = [
        f"avobuild-manifest {manifest.manifest_version}",
        f"type {manifest.type.value}",
        f"name {manifest.name}",
        f"version {manifest.version}",
        f"compatible {manifest.compatible}",
        f"build-date {manifest.build_date}",
    ]
    if policy.security_version is not None:
        lines.append(f"security-version {policy.security_version}")
    if policy.min_applier_version is not None:
        lines.append(f"min-applier-version {policy.min_applier_version}")
    if policy.expires is not None:
        lines.append(f"expires {policy.expires}")
    compression = manifest.compression.value
    if manifest.stream is not None:
        compression += f" {manifest.stream.frame_chunks} {manifest.stream.window_log}"
    lines += [f"chunk-size {manifest.chunk_size}", f"compression {compression}"]
    if manifest.encryption is not None:
        encryption = manifest.encryption
        lines.append(f"encryption {encryption.algorithm} {encryption.key_commitment}")
    for image in manifest.images:
        lines.append(f"image {image.name} {image.size} {image.sha256} {image.chunk_count}")
        if image.source is not None and image.target is not None:
            lines.append(f"source {image.source.size} {image.source.sha256}")
            lines.append(f"target {image.target.size} {image.target.sha256}")
        lines.extend(
            f"chunk {image.name} {chunk.index} {chunk.stored_size} {chunk.sha256}"
            + (f" {chunk.data_sha256}" if chunk.data_sha256 is not None else "")
            for chunk in image.chunks
        )
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    # Parsing back is the one definition of validity, so a writer can never produce a
    # manifest the reader refuses.
    try:
        parsed = parse_manifest(data)
    except BundleError as error:
        raise BundleError(f"invalid manifest: {error}") from None
    if parsed != manifest:
        raise BundleError("invalid manifest: it does not survive a render/parse round trip")
    return data


class _Lines:
    """A cursor over the manifest's lines; `number` is the line the last error is about."""

    def __init__(self, lines: list[str]) -> None:
        self._lines = lines
        self.number = 0

    def __bool__(self) -> bool:
        return self.number < len(self._lines)

    def next(self) -> list[str]:
        line = self._lines[self.number]
        self.number += 1
        if not line:
            raise BundleError("empty line")
        fields = line.split(" ")
        if "" in fields:
            raise BundleError(
                "fields must be separated by exactly one space, with none at the ends"
            )
        return fields

    def peek(self) -> str | None:
        """The keyword of the next line, if there is one."""
        if not self:
            return None
        return self._lines[self.number].split(" ", 1)[0]

    def expect(self, keyword: str, count: int) -> list[str]:
        """The values of the next line, which must be `keyword` followed by `count` values."""
        if not self:
            self.number += 1
            raise BundleError(f"the manifest ends where a {keyword!r} line was expected")
        fields = self.next()
        if fields[0] != keyword:
            raise BundleError(
                f"expected a line starting with {keyword!r}, got {_describe_keyword(fields[0])}"
            )
        if len(fields) != count + 1:
            raise BundleError(f"{keyword}: expected {count} value(s), got {len(fields) - 1}")
        return fields[1:]


_FIXED_KEYWORDS = (
    "avobuild-manifest",
    "type",
    "name",
    "version",
    "compatible",
    "build-date",
    "chunk-size",
    "compression",
)
_POLICY_KEYWORDS = ("security-version", "min-applier-version", "expires", "encryption")


def _describe_keyword(keyword: str) -> str:
    if keyword in _FIXED_KEYWORDS or keyword in ("image", "chunk", "source", "target"):
        return f"{shown(keyword)} (out of order or repeated)"
    if keyword in _POLICY_KEYWORDS:
        return f"{shown(keyword)} (out of order, repeated, or in a version 1 manifest)"
    return (
        f"unknown keyword {shown(keyword)} (not part of manifest version {MANIFEST_VERSION_POLICY})"
    )


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes; every error is a BundleError naming the line."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise BundleError(f"manifest is {len(data)} bytes, over the limit of {MAX_MANIFEST_SIZE}")
    if not data:
        raise BundleError("manifest is empty")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise BundleError(
            f"manifest line {line}: byte 0x{data[error.start]:02x} is not ASCII "
            "(every value in a version 1 manifest is ASCII)"
        ) from None
    if not text.endswith("\n"):
        line = text.count("\n") + 1
        raise BundleError(f"manifest line {line}: not terminated by a newline")
    lines = _Lines(text[:-1].split("\n"))
    try:
        return _parse_lines(lines)
    except BundleError as error:
        raise BundleError(f"manifest line {lines.number}: {error}") from None


def _parse_lines(lines: _Lines) -> Manifest:
    magic = lines.next()
    if magic[0] != "avobuild-manifest" or len(magic) != 2:
        raise BundleError(
            f"expected 'avobuild-manifest {MANIFEST_VERSION}', got {shown(' '.join(magic))}"
        )
    if magic[1] not in {str(version) for version in SUPPORTED_MANIFEST_VERSIONS}:
        raise BundleError(
            f"unsupported manifest version {shown(magic[1])} (this avobuild reads versions "
            f"{MANIFEST_VERSION} to {MANIFEST_VERSION_STREAM}; a newer avobuild is needed)"
        )
    manifest_version = int(magic[1])
    (type_value,) = lines.expect("type", 1)
    if type_value not in {member.value for member in BundleType}:
        raise BundleError(f"type: expected 'full' or 'delta', got {shown(type_value)}")
    bundle_type = BundleType(type_value)
    name = check_identifier("name", lines.expect("name", 1)[0])
    version = check_identifier("version", lines.expect("version", 1)[0])
    compatible_text = lines.expect("compatible", 1)[0]
    if manifest_version == MANIFEST_VERSION:
        compatible = check_identifier("compatible", compatible_text)
    else:
        compatible = check_compatible(compatible_text)
    build_date = _decimal("build-date", lines.expect("build-date", 1)[0])
    policy = Policy()
    if manifest_version >= MANIFEST_VERSION_POLICY:
        policy = _parse_policy(lines)
    chunk_size = _chunk_size(lines.expect("chunk-size", 1)[0])
    compression, stream = _parse_compression(lines, manifest_version)
    encryption = None
    if manifest_version >= MANIFEST_VERSION_POLICY and lines.peek() == "encryption":
        algorithm, commitment = lines.expect("encryption", 2)
        if algorithm != ENCRYPTION_ALGORITHM:
            raise BundleError(
                f"encryption: expected {ENCRYPTION_ALGORITHM!r}, got {shown(algorithm)}"
            )
        encryption = Encryption(_sha256("encryption: key commitment", commitment))

    images: list[ImageEntry] = []
    while lines:
        images.append(
            _parse_image(
                lines,
                chunk_size,
                compression,
                {i.name for i in images},
                bundle_type,
                encryption is not None,
            )
        )
    if not images:
        lines.number += 1
        raise BundleError("the manifest ends without listing an image")
    manifest = Manifest(
        name=name,
        version=version,
        compatible=compatible,
        build_date=build_date,
        chunk_size=chunk_size,
        compression=compression,
        images=tuple(images),
        type=bundle_type,
        policy=policy,
        encryption=encryption,
        stream=stream,
    )
    if manifest.manifest_version != manifest_version:
        lines.number = 1
        raise BundleError(
            f"manifest version {manifest_version} for a manifest that uses nothing beyond "
            f"version {manifest.manifest_version}; write the lowest version (one spelling "
            "per manifest)"
        )
    return manifest


def _parse_compression(
    lines: _Lines, manifest_version: int
) -> tuple[Compression, StreamParameters | None]:
    if lines.peek() != "compression":
        lines.expect("compression", 1)
    fields = lines.next()
    values = fields[1:]
    if values and values[0] == Compression.ZSTD_STREAM.value:
        if manifest_version < MANIFEST_VERSION_STREAM:
            raise BundleError(
                f"compression: zstd-stream needs manifest version {MANIFEST_VERSION_STREAM}"
            )
        if len(values) != 3:
            raise BundleError(
                "compression: expected 'zstd-stream <frame-chunks> <window-log>', "
                f"got {len(values) - 1} value(s) after zstd-stream"
            )
        frame_chunks = _decimal("compression: frame-chunks", values[1])
        window_log = _decimal("compression: window-log", values[2])
        return Compression.ZSTD_STREAM, check_stream(StreamParameters(frame_chunks, window_log))
    if len(values) != 1:
        raise BundleError(f"compression: expected 1 value(s), got {len(values)}")
    if values[0] not in (Compression.ZSTD.value, Compression.NONE.value):
        raise BundleError(
            "compression: expected 'zstd', 'none' or 'zstd-stream <frame-chunks> <window-log>', "
            f"got {shown(values[0])}"
        )
    return Compression(values[0]), None


def check_stream(stream: StreamParameters) -> StreamParameters:
    if not 1 <= stream.frame_chunks <= MAX_FRAME_CHUNKS:
        raise BundleError(
            f"compression: frame-chunks: expected 1 to {MAX_FRAME_CHUNKS}, "
            f"got {stream.frame_chunks}"
        )
    if not MIN_WINDOW_LOG <= stream.window_log <= MAX_WINDOW_LOG:
        raise BundleError(
            f"compression: window-log: expected {MIN_WINDOW_LOG} to {MAX_WINDOW_LOG}, "
            f"got {stream.window_log}"
        )
    return stream


def _parse_policy(lines: _Lines) -> Policy:
    security_version = min_applier_version = expires = None
    if lines.peek() == "security-version":
        security_version = _decimal("security-version", lines.expect("security-version", 1)[0])
    if lines.peek() == "min-applier-version":
        min_applier_version = check_applier_version(lines.expect("min-applier-version", 1)[0])
    if lines.peek() == "expires":
        expires = _decimal("expires", lines.expect("expires", 1)[0])
    return Policy(security_version, min_applier_version, expires)


def _chunk_size(text: str) -> int:
    try:
        return check_chunk_size(_decimal("chunk-size", text))
    except BundleError:
        raise BundleError(
            f"chunk-size: expected a power of two between {MIN_CHUNK_SIZE} and "
            f"{MAX_CHUNK_SIZE}, got {shown(text)}"
        ) from None


def _parse_image(
    lines: _Lines,
    chunk_size: int,
    compression: Compression,
    seen: set[str],
    bundle_type: BundleType,
    encrypted: bool = False,
) -> ImageEntry:
    name, size_text, digest_text, count_text = lines.expect("image", 4)
    check_image_name(name)
    if name in seen:
        raise BundleError(f"image {shown(name)} is listed twice")
    size = _decimal(f"image {name}: size", size_text)
    digest = _sha256(f"image {name}: sha256", digest_text)
    count = _decimal(f"image {name}: chunk-count", count_text)
    expected_count = chunk_count(size, chunk_size)
    if count != expected_count:
        raise BundleError(
            f"image {name}: chunk-count: expected {expected_count} for {size} bytes in chunks "
            f"of {chunk_size}, got {count}"
        )
    if size == 0 and digest != EMPTY_SHA256:
        raise BundleError(f"image {name}: sha256: an empty image must have {EMPTY_SHA256}")
    source = target = None
    if bundle_type is BundleType.DELTA:
        source = _parse_ref(lines, "source", name)
        target = _parse_ref(lines, "target", name)
    chunks = tuple(
        _parse_chunk(lines, name, size, index, chunk_size, compression, encrypted)
        for index in range(count)
    )
    return ImageEntry(name, size, digest, chunks, source, target)


def _parse_ref(lines: _Lines, keyword: str, image: str) -> ImageRef:
    size_text, digest_text = lines.expect(keyword, 2)
    return ImageRef(
        _decimal(f"{keyword} of image {image}: size", size_text),
        _sha256(f"{keyword} of image {image}: sha256", digest_text),
    )


def _parse_chunk(
    lines: _Lines,
    image: str,
    size: int,
    index: int,
    chunk_size: int,
    compression: Compression,
    encrypted: bool = False,
) -> ChunkEntry:
    where = f"chunk {index} of image {image}"
    streamed = compression is Compression.ZSTD_STREAM
    fields = lines.expect("chunk", 5 if streamed else 4)
    owner, index_text, stored_text, digest_text = fields[:4]
    if owner != image or index_text != str(index):
        raise BundleError(
            f"expected the line of {where}, got chunk {shown(index_text)} of image {shown(owner)}"
        )
    stored = _decimal(f"{where}: stored-size", stored_text)
    data_size = min(chunk_size, size - index * chunk_size)
    overhead = ENCRYPTION_OVERHEAD if encrypted else 0
    if compression is Compression.NONE and stored != data_size + overhead:
        raise BundleError(
            f"{where}: stored-size: expected {data_size + overhead} (compression none), "
            f"got {stored}"
        )
    limit = max_stored_size(data_size, compression, encrypted)
    if not 1 <= stored <= limit:
        raise BundleError(
            f"{where}: stored-size: expected 1 to {limit} for {data_size} bytes of data, "
            f"got {stored}"
        )
    digest = _sha256(f"{where}: sha256", digest_text)
    data_digest = _sha256(f"{where}: data sha256", fields[4]) if streamed else None
    return ChunkEntry(index=index, stored_size=stored, sha256=digest, data_sha256=data_digest)
