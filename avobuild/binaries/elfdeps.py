"""The shared libraries a host binary needs, found from its ELF dynamic section.

The recovery initramfs carries a few host tools (mke2fs, sfdisk, openssl, ...) copied from
the build machine; each needs its program interpreter (PT_INTERP) and the transitive closure
of its DT_NEEDED libraries. They are resolved the way the dynamic loader would for a system
without ld.so.cache entries: DT_RUNPATH/DT_RPATH first, then the multiarch and plain library
directories. Nothing is executed (unlike ldd), so this also works for a foreign architecture
tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from avobuild.errors import BuildError

LIBRARY_DIRECTORIES = (
    Path("/lib/x86_64-linux-gnu"),
    Path("/usr/lib/x86_64-linux-gnu"),
    Path("/lib64"),
    Path("/lib"),
    Path("/usr/lib"),
)


def _read_dynamic(path: Path) -> tuple[str | None, list[str], list[str]]:
    """(interpreter, needed sonames, search directories from RUNPATH/RPATH)."""
    try:
        with path.open("rb") as handle:
            elf = ELFFile(handle)
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
    origin = str(path.parent)
    return interpreter, needed, [entry.replace("$ORIGIN", origin) for entry in search if entry]


def cast_tag(tag: object) -> Any:
    return cast(Any, tag)


def shared_libraries(binary: Path) -> dict[str, Path]:
    """Every file `binary` needs at run time, keyed by the path it must have on the target.

    The interpreter keeps its absolute path (e.g. /lib64/ld-linux-x86-64.so.2); libraries are
    placed under /lib/x86_64-linux-gnu/ by soname, where the interpreter finds them. A static
    binary needs nothing. Raises `BuildError` naming the binary and the missing soname.
    """
    result: dict[str, Path] = {}
    pending = [binary]
    seen: set[Path] = set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        interpreter, needed, search = _read_dynamic(current)
        if interpreter is not None and interpreter not in result:
            host_interpreter = Path(interpreter)
            if not host_interpreter.exists():
                raise BuildError(f"{current}: its interpreter {interpreter} is not on this host")
            result[interpreter] = host_interpreter
        for soname in needed:
            target = f"/lib/x86_64-linux-gnu/{soname}"
            # libc names the interpreter as a library; the interpreter's own path serves it.
            if target in result or (interpreter and Path(interpreter).name == soname):
                continue
            found = _find_library(soname, [Path(entry) for entry in search])
            if found is None:
                raise BuildError(
                    f"{binary}: needs {soname} (through {current}), which is in none of "
                    + ", ".join(str(directory) for directory in LIBRARY_DIRECTORIES)
                )
            result[target] = found
            pending.append(found)
    return dict(sorted(result.items()))


def _find_library(soname: str, extra: list[Path]) -> Path | None:
    for directory in (*extra, *LIBRARY_DIRECTORIES):
        candidate = directory / soname
        if candidate.is_file():
            return candidate
    return None
