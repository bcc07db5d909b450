"""The 34-byte header of an `.avb` bundle (docs/bundle-format.md, section 2).

`AVOBUNDLE 1 MMMMMMMMMM SSSSSSSSSS\n`: the format version and the sizes of the manifest and
the signature block, checked against the format's limits before either region is read.
Shared by the reader, the writer and the re-signer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from avobuild.bundle.manifest import MAX_MANIFEST_SIZE
from avobuild.bundle.sign import MAX_SIGNATURE_BLOCK_SIZE
from avobuild.errors import BundleError, shown

MAGIC = b"AVOBUNDLE"
FORMAT_VERSION = 1
HEADER_SIZE = 34
_HEADER = re.compile(rb"AVOBUNDLE ([0-9]) ([0-9]{10}) ([0-9]{10})\n")


@dataclass(frozen=True)
class BundleHeader:
    format_version: int
    manifest_size: int
    signature_block_size: int

    @property
    def payload_offset(self) -> int:
        return HEADER_SIZE + self.manifest_size + self.signature_block_size


def render_header(manifest_size: int, signature_block_size: int) -> bytes:
    return b"AVOBUNDLE %d %010d %010d\n" % (FORMAT_VERSION, manifest_size, signature_block_size)


def parse_header(data: bytes) -> BundleHeader:
    """Parse the 34-byte header and check the region sizes against the limits."""
    if not data.startswith(MAGIC + b" "):
        raise BundleError(
            f"not an avobuild bundle: it starts with {shown(data[:10])}, expected 'AVOBUNDLE '"
        )
    version = data[10:11]
    if version != b"%d" % FORMAT_VERSION:
        raise BundleError(
            f"unsupported bundle format version {shown(version)} "
            f"(this avobuild reads version {FORMAT_VERSION}; a newer avobuild is needed)"
        )
    match = _HEADER.fullmatch(data)
    if match is None:
        raise BundleError(
            f"malformed header {shown(data)}: expected 'AVOBUNDLE 1 ' then the manifest size "
            "and the signature block size as 10 decimal digits each, separated by a space, then "
            "a newline"
        )
    manifest_size = int(match.group(2))
    signature_block_size = int(match.group(3))
    if not 1 <= manifest_size <= MAX_MANIFEST_SIZE:
        raise BundleError(
            f"header: manifest size {manifest_size} is out of bounds (1 to {MAX_MANIFEST_SIZE})"
        )
    if not 1 <= signature_block_size <= MAX_SIGNATURE_BLOCK_SIZE:
        raise BundleError(
            f"header: signature block size {signature_block_size} is out of bounds "
            f"(1 to {MAX_SIGNATURE_BLOCK_SIZE})"
        )
    return BundleHeader(FORMAT_VERSION, manifest_size, signature_block_size)
