"""`bundle info`: what a bundle says about itself, verified or not."""

from __future__ import annotations

from dataclasses import dataclass

from avobuild.bundle.manifest import BundleType, Compression, ImageRef
from avobuild.bundle.reader import BundleReader


@dataclass(frozen=True)
class ImageInfo:
    """One image of the manifest; `source` and `target` for the images of a delta bundle."""

    name: str
    size: int
    sha256: str
    chunks: int
    stored_size: int
    source: ImageRef | None = None
    target: ImageRef | None = None


@dataclass(frozen=True)
class SignatureInfo:
    """One `signature` line: `supported` when this avobuild can check its algorithm."""

    algorithm: str
    key_id: str
    supported: bool


@dataclass(frozen=True)
class BundleInfo:
    """A bundle described. The manifest's values are trustworthy only when
    `signature_verified`; `signer` and `signers` are then the trusted signers' key-ids."""

    file: str
    format: int
    type: BundleType
    name: str
    version: str
    compatible: str
    build_date: int
    manifest_version: int
    security_version: int | None
    min_applier_version: str | None
    expires: int | None
    encryption: str | None
    chunk_size: int
    compression: Compression
    images: tuple[ImageInfo, ...]
    signatures: tuple[SignatureInfo, ...]
    certificates: tuple[str, ...]
    signature_verified: bool
    signer: str | None
    signers: tuple[str, ...]
    manifest_size: int
    signature_block_size: int
    payload_offset: int
    payload_size: int

    @property
    def total_size(self) -> int:
        return self.payload_offset + self.payload_size


def bundle_info(reader: BundleReader) -> BundleInfo:
    """Describe the bundle; its manifest is verified only if the reader's signature was."""
    manifest = reader.manifest if reader.signature_verified else reader.unverified_manifest()
    signer = reader.signer
    return BundleInfo(
        file=reader.name,
        format=reader.header.format_version,
        type=manifest.type,
        name=manifest.name,
        version=manifest.version,
        compatible=manifest.compatible,
        build_date=manifest.build_date,
        manifest_version=manifest.manifest_version,
        security_version=manifest.policy.security_version,
        min_applier_version=manifest.policy.min_applier_version,
        expires=manifest.policy.expires,
        encryption=manifest.encryption.algorithm if manifest.encryption else None,
        chunk_size=manifest.chunk_size,
        compression=manifest.compression,
        images=tuple(
            ImageInfo(
                image.name,
                image.size,
                image.sha256,
                image.chunk_count,
                image.stored_size,
                image.source,
                image.target,
            )
            for image in manifest.images
        ),
        signatures=tuple(
            SignatureInfo(entry.algorithm, entry.key_id, entry.supported)
            for entry in reader.signature_block.signatures
        ),
        certificates=tuple(entry.key_id for entry in reader.signature_block.certificates),
        signature_verified=signer is not None,
        signer=signer.key_id if signer is not None else None,
        signers=tuple(verified.key_id for verified in reader.signers),
        manifest_size=reader.header.manifest_size,
        signature_block_size=reader.header.signature_block_size,
        payload_offset=reader.payload_offset,
        payload_size=manifest.payload_size,
    )
