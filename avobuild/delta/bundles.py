"""Delta bundles: made from two full bundles, applied on the host, measured.

`create_delta_bundle` unpacks the images of the old and the new full bundle into a work
directory (chunk by chunk, each chunk checked against its manifest), encodes one delta stream
per image of the new bundle and writes them as a `type delta` bundle (docs/bundle-format.md)
with the new bundle's name, version, compatible string, build date and policy (each policy
line may be overridden), signed and optionally encrypted by a `SigningPlan` like any bundle.
An image the old bundle lacks gets a delta from the empty image (all `data`); an image only
the old bundle has is simply not in the delta (docs/delta-format.md, "Images").

The host-side applier is `delta.bundle_apply`, kept apart so that applying loads none of
the encoder (its imports alone are about 11 MB of a `delta apply`'s peak memory).
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from avobuild.bundle.crypt import DecryptionKey
from avobuild.bundle.keys import Keyring
from avobuild.bundle.manifest import EMPTY_SHA256, BundleType, ImageRef, Manifest, Policy
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.sign import KeySigner
from avobuild.bundle.signing import SigningMaterial
from avobuild.bundle.writer import ImageSource, write_bundle
from avobuild.delta.bundle_apply import StepProgress, no_progress
from avobuild.delta.encode import DEFAULT_DELTA_LEVEL, DeltaSummary, encode_delta
from avobuild.delta.plan import DEFAULT_DICTIONARY_SIZE, DEFAULT_EXTENT_SIZE
from avobuild.delta.stream import STREAM_VERSION
from avobuild.errors import BundleError

# The delta stream is mostly zstd frames already; the bundle's own compression only needs to
# squeeze the operation lines.
STREAM_BUNDLE_LEVEL = 3


@dataclass(frozen=True)
class DeltaBundleResult:
    manifest: Manifest | None  # None when the full bundle was written instead
    full_size: int
    delta_size: int
    wrote_full: bool
    deltas: tuple[tuple[str, DeltaSummary], ...]

    @property
    def reduction(self) -> float:
        """Percent of the full bundle's size the delta saves (negative: the delta is larger)."""
        return 100.0 * (1 - self.delta_size / self.full_size) if self.full_size else 0.0


def read_manifest(reader: BundleReader, keyring: Keyring | None) -> Manifest:
    if keyring is not None:
        reader.verify_signature(keyring)
        return reader.manifest
    return reader.unverified_manifest()


def extract_images(
    bundle: Path,
    directory: Path,
    keyring: Keyring | None,
    prefix: str,
    decryption: DecryptionKey | None = None,
) -> tuple[Manifest, dict[str, Path]]:
    """Unpack every image of a full bundle into `directory` as `<prefix>-<name>.img`.

    With a keyring the signature is checked first (and `decryption` opens an encrypted
    payload); without one the manifest is taken as is (for measuring), but every chunk and
    image is still checked against it.
    """
    with BundleReader.open(bundle) as reader:
        manifest = read_manifest(reader, keyring)
        if keyring is not None:
            reader.unlock(decryption)
        if manifest.type is not BundleType.FULL:
            raise BundleError(
                f"{bundle}: is a {manifest.type} bundle; deltas are made from full ones"
            )
        paths = {image.name: directory / f"{prefix}-{image.name}.img" for image in manifest.images}
        handles = {name: path.open("wb") for name, path in paths.items()}
        try:
            chunks = (
                reader.iter_chunks() if keyring is not None else reader.iter_unverified_chunks()
            )
            for image, _chunk, data in chunks:
                handles[image.name].write(data)
        finally:
            for handle in handles.values():
                handle.close()
    return manifest, paths


def create_delta_bundle(
    old: Path,
    new: Path,
    output: Path,
    work: Path,
    *,
    signing: SigningMaterial,
    keyring: Keyring | None,
    policy: Policy | None = None,
    decryption: DecryptionKey | None = None,
    full_if_larger: bool = False,
    level: int = DEFAULT_DELTA_LEVEL,
    extent_size: int = DEFAULT_EXTENT_SIZE,
    dictionary_size: int = DEFAULT_DICTIONARY_SIZE,
    threads: int | None = None,
    progress: StepProgress = no_progress,
    stream_version: int = STREAM_VERSION,
) -> DeltaBundleResult:
    """Write the delta bundle from `old` to `new` (full bundles) to `output`.

    `stream_version` 1 makes streams that appliers older than stream version 2 read (no
    `bspatch`, docs/delta-format.md section 6).

    `signing` signs it (and encrypts its payload if it holds a content key); `policy` lines
    that are set replace the new bundle's. `decryption` opens encrypted `old` and `new`
    bundles. If the delta bundle is not smaller than `new` and `full_if_larger` is set,
    `output` becomes a copy of `new` instead; the result says which was written.
    """
    old_manifest, old_images = extract_images(old, work, keyring, "old", decryption)
    new_manifest, new_images = extract_images(new, work, keyring, "new", decryption)
    if new_manifest.encryption is not None and signing.content_key is None:
        raise BundleError(
            f"{new}: is encrypted, and a delta holds its content; encrypt the delta too "
            "(--encrypt-for or --encryption-key)"
        )
    delta_policy = _override(new_manifest.policy, policy or Policy())
    empty = work / "empty.img"
    empty.write_bytes(b"")
    sources = []
    summaries = []
    for image in new_manifest.images:
        previous = old_manifest.image(image.name)
        source_path = old_images[image.name] if previous is not None else empty
        source_ref = (
            ImageRef(previous.size, previous.sha256)
            if previous is not None
            else ImageRef(0, EMPTY_SHA256)
        )
        target_ref = ImageRef(image.size, image.sha256)
        stream_path = work / f"delta-{image.name}.stream"

        def report(done: int, total: int, name: str = image.name) -> None:
            progress(f"delta {name}", done, total)

        with stream_path.open("wb") as stream:
            summary = encode_delta(
                source_path,
                source_ref,
                new_images[image.name],
                target_ref,
                stream,
                level=level,
                extent_size=extent_size,
                dictionary_size=dictionary_size,
                threads=threads,
                progress=report,
                version=stream_version,
            )
        summaries.append((image.name, summary))
        sources.append(ImageSource(image.name, stream_path, source=source_ref, target=target_ref))
        new_images[image.name].unlink()
    manifest = write_bundle(
        output,
        sources,
        name=new_manifest.name,
        version=new_manifest.version,
        compatible=new_manifest.compatible,
        build_date=new_manifest.build_date,
        signers=signing.signers,
        certificates=signing.certificates,
        unsigned=signing.unsigned,
        encryption_key=signing.content_key,
        recipients=signing.recipients,
        chunk_size=new_manifest.chunk_size,
        level=STREAM_BUNDLE_LEVEL,
        threads=threads,
        policy=delta_policy,
    )
    full_size = new.stat().st_size
    delta_size = output.stat().st_size
    wrote_full = False
    if delta_size >= full_size and full_if_larger:
        _copy_atomically(new, output)
        wrote_full = True
    return DeltaBundleResult(
        None if wrote_full else manifest, full_size, delta_size, wrote_full, tuple(summaries)
    )


def _override(policy: Policy, changes: Policy) -> Policy:
    """`policy` with every line `changes` sets replaced."""
    return replace(
        policy,
        **{
            field.name: getattr(changes, field.name)
            for field in fields(changes)
            if getattr(changes, field.name) is not None
        },
    )


def measure_delta(
    old: Path,
    new: Path,
    work: Path,
    *,
    keyring: Keyring | None,
    level: int = DEFAULT_DELTA_LEVEL,
    progress: StepProgress = no_progress,
) -> DeltaBundleResult:
    """Build the delta bundle in `work`, signed by a throwaway key, only to measure it.

    An Ed25519 signature has a fixed size, so the measured size is the size of the bundle
    the release key would sign.
    """
    return create_delta_bundle(
        old,
        new,
        work / "measured-delta.avb",
        work,
        signing=SigningMaterial(
            (KeySigner(ed25519.Ed25519PrivateKey.generate()),), (), False, None, ()
        ),
        keyring=keyring,
        level=level,
        progress=progress,
    )


def _copy_atomically(source: Path, output: Path) -> None:
    temporary = output.parent / f".{output.name}.{secrets.token_hex(6)}.tmp"
    try:
        shutil.copyfile(source, temporary)
        temporary.replace(output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
