"""The one chokepoint through which avobuild runs external tools.

Every tool is resolved with `shutil.which`, run from an argv list (never a shell) in a fixed
environment so its output does not depend on the caller's locale, time zone or umask, and a
failure raises `ToolFailed` carrying a command line the user can paste and rerun.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from avobuild.errors import RecipeError, ToolFailed, ToolMissing

log = logging.getLogger("avobuild.run")


class ToolUse(enum.StrEnum):
    """Who needs a tool: avobuild itself on a build host, or only its test suite."""

    BUILD = "build"
    TEST = "test"


@dataclass(frozen=True)
class Tool:
    """A host tool: its executable name, why avobuild needs it and the Debian package with it."""

    name: str
    purpose: str
    package: str
    use: ToolUse = ToolUse.BUILD


# The host tools avobuild may run. Keeping them in one table lets `avobuild doctor`, the
# Makefile's setup and error messages agree on names and packages.
TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool("mke2fs", "build ext4 filesystems", "e2fsprogs"),
        Tool("e2fsck", "check ext4 filesystems", "e2fsprogs"),
        Tool("debugfs", "read files back out of ext4 filesystems", "e2fsprogs"),
        Tool("mkfs.vfat", "build FAT filesystems (the EFI system partition)", "dosfstools"),
        Tool("fsck.vfat", "check FAT filesystems", "dosfstools"),
        Tool("mcopy", "copy files into FAT filesystems", "mtools"),
        Tool("mmd", "create directories in FAT filesystems", "mtools"),
        Tool("mtype", "read files from FAT filesystems", "mtools", ToolUse.TEST),
        Tool("mdir", "list FAT filesystems", "mtools"),
        Tool("mksquashfs", "build squashfs images", "squashfs-tools"),
        Tool("unsquashfs", "read squashfs images", "squashfs-tools"),
        Tool("mkfs.erofs", "build erofs images", "erofs-utils"),
        Tool("sfdisk", "check partition tables", "fdisk"),
        Tool("openssl", "check signatures independently", "openssl"),
        Tool("zstd", "decompress bundle chunks", "zstd"),
        Tool("busybox", "provide a userland for images and the applier", "busybox-static"),
        Tool("xorriso", "inspect ISO 9660 media independently (tests)", "xorriso", ToolUse.TEST),
        Tool("env", "run mksquashfs and mkfs.erofs without SOURCE_DATE_EPOCH", "coreutils"),
        Tool("resize2fs", "carry ext4 resizing into recovery systems", "e2fsprogs"),
        Tool("tune2fs", "carry ext4 tuning into recovery systems", "e2fsprogs"),
        Tool("blkid", "carry block device probing into recovery systems", "util-linux"),
        Tool("smartctl", "carry disk health checks into recovery systems", "smartmontools"),
        Tool("grub-mkimage", "build GRUB EFI images for USB and PXE recovery", "grub-common"),
        Tool("cpio", "list initramfs archives independently (tests)", "cpio", ToolUse.TEST),
        Tool("qemu-system-x86_64", "boot recovery media in tests", "qemu-system-x86", ToolUse.TEST),
        Tool("mkimage", "compile the U-Boot boot script of the applier", "u-boot-tools"),
        Tool("mkenvimage", "check U-Boot environment images (tests)", "u-boot-tools", ToolUse.TEST),
        Tool("grub-editenv", "check GRUB environment blocks (tests)", "grub-common", ToolUse.TEST),
        Tool(
            "grub-script-check",
            "check the applier's grub.cfg syntax (tests)",
            "grub-common",
            ToolUse.TEST,
        ),
        Tool(
            "fw_printenv",
            "read U-Boot environments like a device (tests)",
            "libubootenv-tool",
            ToolUse.TEST,
        ),
        Tool(
            "fw_setenv",
            "write U-Boot environments like a device (tests)",
            "libubootenv-tool",
            ToolUse.TEST,
        ),
    )
}


def source_date_epoch() -> int:
    """The build timestamp: SOURCE_DATE_EPOCH when set (reproducible builds), else the time
    this process first asked, so every file and the bundle of one build carry one date."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not value:
        return _build_start()
    if not value.isascii() or not value.isdigit():
        raise RecipeError(
            f"SOURCE_DATE_EPOCH: expected seconds since 1970 (0 or more), got {value!r}"
        )
    return int(value)


@functools.cache
def _build_start() -> int:
    return int(time.time())


def tool_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean, fixed environment: only PATH survives from the caller."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "SOURCE_DATE_EPOCH": str(source_date_epoch()),
        # mtools refuses images whose FAT geometry looks odd unless told not to worry.
        "MTOOLS_SKIP_CHECK": "1",
    }
    if extra:
        env.update(extra)
    return env


def which(name: str) -> str:
    """Resolve a tool to its path, or raise `ToolMissing` naming the package to install."""
    found = shutil.which(name) or _find_in_sbin(name)
    if found is None:
        tool = TOOLS.get(name, Tool(name, "run a build step", name))
        raise ToolMissing(tool.name, tool.purpose, tool.package)
    return found


def _find_in_sbin(name: str) -> str | None:
    # Non-root users often lack /sbin in PATH although mke2fs and friends live there.
    for directory in ("/usr/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def run(
    argv: Sequence[str | Path],
    *,
    input_bytes: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ok_codes: Sequence[int] = (0,),
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool and return its completed process; raise `ToolFailed` on an unexpected code."""
    args = [str(part) for part in argv]
    executable = which(args[0])
    command = shlex.join(args)
    log.debug("+ %s", command)
    completed = subprocess.run(  # noqa: S603 - argv list, resolved executable, no shell
        [executable, *args[1:]],
        input=input_bytes,
        capture_output=True,
        env=tool_environment(env),
        cwd=cwd,
        check=False,
    )
    if completed.returncode not in ok_codes:
        raise ToolFailed(command, completed.returncode, completed.stderr.decode(errors="replace"))
    return completed


def run_feeding(
    argv: Sequence[str | Path],
    feed: Callable[[IO[bytes]], None],
    *,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool whose standard input `feed` writes from a thread, as a stream.

    An exception in `feed` (a hostile input it refused half way) stops the tool and is
    raised in preference to the tool's own complaint about its truncated input.
    """
    args = [str(part) for part in argv]
    executable = which(args[0])
    command = shlex.join(args)
    log.debug("+ %s", command)
    problems: list[BaseException] = []
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(  # noqa: S603 - argv list, resolved executable, no shell
            [executable, *args[1:]],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=stderr,
            env=tool_environment(env),
        )
        assert process.stdin is not None
        pipe = process.stdin

        def pump() -> None:
            try:
                feed(pipe)
            except BrokenPipeError:
                pass
            except BaseException as error:
                problems.append(error)
                process.kill()
            finally:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()

        feeder = threading.Thread(target=pump, name=f"feed {args[0]}")
        feeder.start()
        returncode = process.wait()
        feeder.join()
        stdout.seek(0)
        stderr.seek(0)
        completed = subprocess.CompletedProcess(args, returncode, stdout.read(), stderr.read())
    if problems:
        raise problems[0]
    if returncode != 0:
        raise ToolFailed(command, returncode, completed.stderr.decode(errors="replace"))
    return completed


def run_text(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ok_codes: Sequence[int] = (0,),
) -> str:
    """Run a tool and return its standard output decoded as UTF-8."""
    return run(argv, env=env, cwd=cwd, ok_codes=ok_codes).stdout.decode(errors="replace")
