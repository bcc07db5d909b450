"""avobuild's delta engine on raw images, without bundles: what the peers are compared with.

engine.py encode OLD.img NEW.img OUT.stream [STREAM-VERSION]
engine.py apply OUT.stream OLD.img APPLIED.img

STREAM-VERSION is 2 by default (file-aware bsdiff for ext4 images), 1 for zstd only.
"""

from __future__ import annotations

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from avobuild.bundle.manifest import ImageRef
from avobuild.delta.apply import apply_delta_file
from avobuild.delta.encode import encode_delta


def image_ref(path: Path) -> ImageRef:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return ImageRef(path.stat().st_size, digest.hexdigest())


def main() -> None:
    command, *paths = sys.argv[1:]
    if command == "encode":
        old, new, output = map(Path, paths[:3])
        version = int(paths[3]) if len(paths) > 3 else 2
        with ThreadPoolExecutor(2) as pool:
            old_ref, new_ref = pool.map(image_ref, (old, new))
        with output.open("wb") as stream:
            encode_delta(old, old_ref, new, new_ref, stream, version=version)
    elif command == "apply":
        stream_path, old, applied = map(Path, paths)
        apply_delta_file(stream_path, old, applied)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
