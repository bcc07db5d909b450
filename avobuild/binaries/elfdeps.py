"""The shared libraries a binary needs, found from its ELF dynamic section.

The recovery initramfs and the device's rootfs carry a few tools (mke2fs, sfdisk, openssl,
...) copied from the build machine or from a target sysroot (the packages of another
architecture unpacked by scripts/fetch-sysroot); each needs its program interpreter
(PT_INTERP) and the transitive closure of its DT_NEEDED libraries. They are resolved the way
the dynamic loader would for a system without ld.so.cache entries: DT_RUNPATH/DT_RPATH first,
then the multiarch directory of the binary's machine (x86_64-linux-gnu, aarch64-linux-gnu,
...) and the plain library directories, all inside the sysroot when there is one (absolute
RUNPATHs and the interpreter are target paths). Nothing is executed (unlike ldd), so a
foreign architecture resolves as well as the host's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from avobuild.errors import BuildError

# Debian's multiarch directory for each ELF machine (pyelftools' e_machine names).
MULTIARCH = {
    "EM_X86_64": "x86_64-linux-gnu",
    "EM_AARCH64": "aarch64-linux-gnu",
    "EM_ARM": "arm-linux-gnueabihf",
    "EM_RISCV": "riscv64-linux-gnu",
    "EM_386": "i386-linux-gnu",
}


def library_directories(multiarch: str) -> tuple[str, ...]:
    """Where the dynamic loader looks for a library, as target paths."""
    return (f"/lib/{multiarch}", f"/usr/lib/{multiarch}", "/lib64", "/lib", "/usr/lib")


_MAX_HOPS = 40
LIBRARY_DIRECTORIES = tuple(Path(entry) for entry in library_directories("x86_64-linux-gnu"))


def _read_dynamic(path: Path) -> tuple[str, str | None, list[str], list[str]]:
    """(machine, interpreter, needed sonames, search directories from RUNPATH/RPATH)."""
    try:
        with path.open("rb") as handle:
            elf = ELFFile(handle)
            machine = str(elf["e_machine"])
            interpreter = None
            for segment in elf.iter_segments():
                if isinstance(segment, InterpSegment):
                    interpreter = segment.get_interp_name()
            needed: list[str] = []
            search: list[str] = []
            for section in elf.iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                # pyelftools sets needed/runpath/rpath on the tag object dynamically.
                for tag in map(cast_tag, section.iter_tags()):
                    if tag.entry.d_tag == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif tag.entry.d_tag == "DT_RUNPATH":
                        search.extend(tag.runpath.split(":"))
                    elif tag.entry.d_tag == "DT_RPATH":
                        search.extend(tag.rpath.split(":"))
    except (ELFError, OSError) as error:
        raise BuildError(f"{path}: cannot read its ELF dynamic section: {error}") from None
    return machine, interpreter, needed, [entry for entry in search if entry]


def cast_tag(tag: object) -> Any:
    return cast(Any, tag)


def shared_libraries(binary: Path, sysroot: Path | None = None) -> dict[str, Path]:
    """Every file `binary` needs at run time, keyed by the path it must have on the target.

    The interpreter keeps its absolute path (e.g. /lib64/ld-linux-x86-64.so.2); libraries are
    placed under /lib/<multiarch>/ by soname, where the interpreter finds them. A static
    binary needs nothing. With `sysroot`, `binary` is a file inside it and every path is
    looked up there, never on the host. Raises `BuildError` naming the binary and the
    missing soname.
    """
    root = sysroot if sysroot is not None else Path("/")
    result: dict[str, Path] = {}
    pending = [binary]
    seen: set[Path] = set()
    interpreters: set[str] = set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        machine, interpreter, needed, search = _read_dynamic(current)
        multiarch = MULTIARCH.get(machine)
        if multiarch is None:
            raise BuildError(f"{current}: no library directories known for ELF machine {machine}")
        if interpreter is not None:
            interpreters.add(Path(interpreter).name)
        if interpreter is not None and interpreter not in result:
            found_interpreter = resolve_in_root(root, interpreter)
            if not found_interpreter.exists():
                where = f"in {sysroot}" if sysroot is not None else "on this host"
                raise BuildError(f"{current}: its interpreter {interpreter} is not {where}")
            result[interpreter] = found_interpreter
        origin = _target_path(root, current.parent)
        directories = [entry.replace("$ORIGIN", origin) for entry in search]
        directories += library_directories(multiarch)
        for soname in needed:
            target = f"/lib/{multiarch}/{soname}"
            # libc names the interpreter as a library; the interpreter's own path serves it.
            if target in result or soname in interpreters:
                continue
            found = _find_library(root, soname, directories)
            if found is None:
                raise BuildError(
                    f"{binary}: needs {soname} (through {current}), which is in none of "
                    + ", ".join(str(resolve_in_root(root, entry)) for entry in directories)
                )
            result[target] = found
            pending.append(found)
    return dict(sorted(result.items()))


def _target_path(root: Path, path: Path) -> str:
    """`path` (a file under `root`) as the device sees it: for $ORIGIN."""
    try:
        return "/" + path.absolute().relative_to(root.absolute()).as_posix()
    except ValueError:
        return str(path)


def resolve_in_root(root: Path, target_path: str) -> Path:
    """A target path looked up under `root` (a sysroot, or / for the host), its symlinks
    followed inside `root`: an absolute link target starts at `root`, never at the host's /.
    """
    parts = [part for part in target_path.split("/") if part and part != "."]
    resolved = root
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved != root:
                resolved = resolved.parent
            continue
        candidate = resolved / part
        if candidate.is_symlink():
            hops += 1
            if hops > _MAX_HOPS:
                raise BuildError(f"{root / target_path.lstrip('/')}: too many levels of symlinks")
            link = str(candidate.readlink())
            if link.startswith("/"):
                resolved = root
            parts = [piece for piece in link.split("/") if piece and piece != "."] + parts
            continue
        resolved = candidate
    return resolved


def _find_library(root: Path, soname: str, directories: list[str]) -> Path | None:
    for directory in directories:
        candidate = resolve_in_root(root, directory) / soname
        if candidate.is_file():
            return candidate
    return None
