"""Applying a delta bundle on the host (`avobuild delta apply`).

`apply_delta_bundle` checks the signature, then for each image checks the given source
file's hash before creating anything, and rebuilds the target from the verified chunks as
they stream by (bounded memory), renaming it into place only after its hash matched. It
imports the stream applier and the bundle reader only, not the encoder (`delta.bundles`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from avobuild.bundle.crypt import DecryptionKey
from avobuild.bundle.keys import Keyring
from avobuild.bundle.manifest import BundleType, ImageRef
from avobuild.bundle.reader import BundleReader
from avobuild.delta.apply import ChunkStream, apply_to_file, image_chunks
from avobuild.errors import BundleError

StepProgress = Callable[[str, int, int], None]


def no_progress(_step: str, _done: int, _total: int) -> None:
    pass


def apply_delta_bundle(
    bundle: Path,
    keyring: Keyring,
    sources: Mapping[str, Path],
    outputs: Mapping[str, Path],
    *,
    decryption: DecryptionKey | None = None,
    progress: StepProgress = no_progress,
) -> dict[str, ImageRef]:
    """Rebuild the images named in `outputs` from their `sources`; return what was built.

    Every image of the bundle is read and verified; those without an output are skipped.
    """
    with BundleReader.open(bundle) as reader:
        reader.verify_signature(keyring)
        reader.unlock(decryption)
        manifest = reader.manifest
        if manifest.type is not BundleType.DELTA:
            raise BundleError(f"{bundle}: is a {manifest.type} bundle, not a delta bundle")
        names = {image.name for image in manifest.images}
        for option, given in (("--source", sources), ("--output", outputs)):
            unknown = sorted(set(given) - names)
            if unknown:
                raise BundleError(
                    f"{option} {unknown[0]}: the bundle has no image of that name "
                    f"(images: {', '.join(sorted(names))})"
                )
        missing = sorted(set(outputs) - set(sources))
        if missing:
            raise BundleError(f"--output {missing[0]}: give its --source {missing[0]}=PATH too")
        chunks = reader.iter_chunks()
        built: dict[str, ImageRef] = {}
        for image in manifest.images:
            own = image_chunks(chunks, image)
            if image.name not in outputs:
                for _ in own:
                    pass
                continue
            assert image.source is not None and image.target is not None

            def report(done: int, total: int, name: str = image.name) -> None:
                progress(f"applying {name}", done, total)

            built[image.name] = apply_to_file(
                ChunkStream(own),
                f"{bundle}: image {image.name}",
                sources[image.name],
                outputs[image.name],
                expected=(image.source, image.target),
                progress=report,
            )
        # Drain anything left so the reader confirms the end of the payload.
        for _ in chunks:
            pass
    return built


def apply_options(values: list[str], option: str) -> dict[str, Path]:
    """NAME=PATH options as a mapping (the CLI's parser, here so it is tested once)."""
    parsed: dict[str, Path] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise BundleError(f"{option} {value!r}: expected NAME=PATH, e.g. rootfs=rootfs.img")
        if name in parsed:
            raise BundleError(f"{option} {name}: given twice")
        parsed[name] = Path(path)
    return parsed
