"""`bundle info`: what a bundle says about itself, verified or not."""

from __future__ import annotations

from avobuild.bundle.reader import BundleReader


def bundle_info(reader: BundleReader) -> dict[str, object]:
    """A JSON-able description of the bundle; the manifest is verified only if the reader was."""
    manifest = reader.manifest if reader.signature_verified else reader.unverified_manifest()
    signer = reader.signer
    return {
        "file": reader.name,
        "format": reader.header.format_version,
        "type": manifest.type.value,
        "name": manifest.name,
        "version": manifest.version,
        "compatible": manifest.compatible,
        "build_date": manifest.build_date,
        "manifest_version": manifest.manifest_version,
        "security_version": manifest.policy.security_version,
        "min_applier_version": manifest.policy.min_applier_version,
        "expires": manifest.policy.expires,
        "encryption": manifest.encryption.algorithm if manifest.encryption else None,
        "chunk_size": manifest.chunk_size,
        "compression": manifest.compression.value,
        "images": [
            {
                "name": image.name,
                "size": image.size,
                "sha256": image.sha256,
                "chunks": image.chunk_count,
                "stored_size": image.stored_size,
                **(
                    {
                        "source": {"size": image.source.size, "sha256": image.source.sha256},
                        "target": {"size": image.target.size, "sha256": image.target.sha256},
                    }
                    if image.source is not None and image.target is not None
                    else {}
                ),
            }
            for image in manifest.images
        ],
        "signatures": [
            {"algorithm": entry.algorithm, "key_id": entry.key_id, "supported": entry.supported}
            for entry in reader.signature_block.signatures
        ],
        "certificates": [entry.key_id for entry in reader.signature_block.certificates],
        "signature_verified": signer is not None,
        "signer": signer.key_id if signer is not None else None,
        "signers": [verified.key_id for verified in reader.signers],
        "manifest_size": reader.header.manifest_size,
        "signature_block_size": reader.header.signature_block_size,
        "payload_offset": reader.payload_offset,
        "payload_size": manifest.payload_size,
        "total_size": reader.payload_offset + manifest.payload_size,
    }
