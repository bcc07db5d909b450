"""Factory image benchmark: `avobuild image` against genimage, same tree, same layout, one run.

Usage (from the repository root; `make -f bench/Makefile bench-image` runs exactly this):

    .venv/bin/python bench/image/run.py [--work build/bench/image] [--runs 5]

The corpus is a real root filesystem: Debian bookworm made by mmdebstrap (as root, so the
tree holds device nodes, setuid binaries and file capabilities) with systemd, OpenSSH,
Python, Perl, GCC and git: about 450 MB in some 25,000 entries, cached in WORK/rootfs. Both
tools build the layout of bench/image/layout.toml (genimage.cfg describes the same
partitions): a FAT ESP, two 1 GiB ext4 slots (A holds the tree, B empty), a data partition.
Runs alternate between the tools; each run records wall time and peak RSS (GNU time: %e
and %M, which is the peak of the tool's own process: avobuild's Python process, genimage's C
process; the mke2fs they both run is not included). The medians and their ratio are printed
as a Markdown table and written with the machine's description to WORK/results.md and
WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from avobuild.fs.common import scan_source_tree, tree_bytes  # noqa: E402
from avobuild.model.tree import Ownership  # noqa: E402

HERE = Path(__file__).resolve().parent
AVOBUILD = REPO / ".venv" / "bin" / "avobuild"
PACKAGES = "systemd-sysv,udev,openssh-server,python3,perl,gcc,git,iputils-ping,less"
EPOCH = "1767225600"


def build_corpus(work: Path) -> Path:
    tree = work / "rootfs"
    stamp = work / "rootfs.done"
    if stamp.exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    subprocess.run(  # noqa: S603
        [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={PACKAGES}",
            "bookworm",
            str(tree),
            "http://deb.debian.org/debian",
        ],
        check=True,
    )
    stamp.write_text(PACKAGES + "\n")
    return tree


def tree_size(tree: Path) -> tuple[int, int]:
    entries = scan_source_tree(tree, Ownership.PRESERVE)
    return tree_bytes(entries), len(entries)


def timed(argv: list[str], work: Path, cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a command, from GNU time."""
    out = work / "time.txt"
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH}
    subprocess.run(  # noqa: S603
        ["/usr/bin/time", "-f", "%e %M", "-o", str(out), *argv],
        check=True,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall, rss = out.read_text().split()[-2:]
    return float(wall), int(rss)


def run_avobuild(work: Path, tree: Path) -> tuple[float, int]:
    recipe = work / "bench.toml"
    recipe.write_text(
        "[product]\n"
        'name = "bench"\nversion = "1.0.0"\ncompatible = "bench-x86_64"\n'
        f'architecture = "x86_64"\nlayout = "{HERE / "layout.toml"}"\n\n'
        f'[rootfs]\ntree = "{tree}"\n'
    )
    out = work / "avobuild-out"
    shutil.rmtree(out, ignore_errors=True)
    result = timed(
        [
            str(AVOBUILD),
            "image",
            str(recipe),
            "-o",
            str(out),
            "--workdir",
            str(work / "avobuild-work"),
        ],
        work,
    )
    shutil.rmtree(work / "avobuild-work", ignore_errors=True)
    return result


def run_genimage(work: Path, tree: Path) -> tuple[float, int]:
    base = work / "genimage"
    shutil.rmtree(base, ignore_errors=True)
    for name in ("tmp", "input", "output"):
        (base / name).mkdir(parents=True)
    return timed(
        [
            "genimage",
            "--config",
            str(HERE / "genimage.cfg"),
            "--rootpath",
            str(tree),
            "--tmppath",
            str(base / "tmp"),
            "--inputpath",
            str(base / "input"),
            "--outputpath",
            str(base / "output"),
        ],
        work,
        cwd=base,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench" / "image")
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tree = build_corpus(work)
    size, entries = tree_size(tree)
    results: dict[str, list[tuple[float, int]]] = {"avobuild image": [], "genimage": []}
    for _ in range(options.runs):
        results["avobuild image"].append(run_avobuild(work, tree))
        results["genimage"].append(run_genimage(work, tree))
    medians = {
        tool: (statistics.median(w for w, _ in runs), statistics.median(r for _, r in runs))
        for tool, runs in results.items()
    }
    base_wall = medians["genimage"][0]
    lines = [
        f"Tree: Debian bookworm ({PACKAGES}), {size / 1e6:.0f} MB of files in {entries} entries.",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"load {os.getloadavg()[0]:.2f}; medians of {options.runs} alternating runs.",
        "",
        "| tool | wall (s) | peak RSS (MB) | wall vs genimage |",
        "| --- | ---: | ---: | ---: |",
    ]
    for tool, (wall, rss) in medians.items():
        lines.append(f"| {tool} | {wall:.2f} | {rss / 1024:.0f} | {wall / base_wall:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    (work / "results.md").write_text(text)
    (work / "results.json").write_text(
        json.dumps(
            {"tree_bytes": size, "entries": entries, "runs": results, "medians": medians}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
