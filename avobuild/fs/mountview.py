"""A read-only overlay view of several directories, for tools that read a single tree.

mkfs.erofs 1.5 builds an image from one directory. To layer avobuild's additions over a
user's tree without changing or copying it, the tool runs in a private mount namespace in
which the two are stacked with a read-only overlayfs mount (no upper layer): the kernel
shows lstat, readlink and xattrs of the lower layers as they are, never follows a symlink
of them and never opens a device node. The namespace, and with it the mount, ends with the
tool. Without root, the namespace is also a user namespace in which the caller is root (an
unprivileged overlay mount needs Linux 5.11).

`python -m avobuild.fs.mountview MOUNTPOINT LAYER... -- COMMAND...` is the program run
inside the namespace (through `run.run`): it mounts, then executes the command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from avobuild.errors import BuildError
from avobuild.run import run, which

_UNSAFE = (":", ",", "\\")


def namespace_prefix() -> list[str | Path]:
    """The argv prefix that runs a command in a new, private mount namespace."""
    if os.geteuid() == 0:
        return ["unshare", "--mount", "--propagation", "private"]
    return ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]


def view_command(mountpoint: Path, layers: list[Path]) -> list[str | Path]:
    """The argv (before the tool's own) that mounts `layers` (top first) at `mountpoint`."""
    for layer in [mountpoint, *layers]:
        if any(char in str(layer) for char in _UNSAFE):
            raise BuildError(f"{layer}: an overlay mount cannot take paths with ':' ',' '\\'")
    return [sys.executable, "-m", "avobuild.fs.mountview", mountpoint, *layers, "--"]


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") < 2:
        print("usage: mountview MOUNTPOINT LAYER... -- COMMAND...", file=sys.stderr)
        return 2
    split = argv.index("--")
    mountpoint, layers, command = argv[0], argv[1:split], argv[split + 1 :]
    lower = ":".join(layers)
    run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", mountpoint])
    os.execv(which(command[0]), command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
