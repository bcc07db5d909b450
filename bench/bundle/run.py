"""Full bundle benchmark: `avobuild bundle create` against `rauc bundle`, same slot image, one run.

Usage (from the repository root; `make -f bench/Makefile bench-bundle` runs exactly this):

    .venv/bin/python bench/bundle/run.py [--work build/bench/bundle] [--runs 3]

The corpus is a real ext4 slot image: the Debian bookworm tree of bench/image/run.py (made
by mmdebstrap, cached in build/bench/image/rootfs) written by `mke2fs -d` into a 640 MiB
ext4 image. Measured, alternating, `--runs` times each:

* `avobuild bundle create --image rootfs=IMG` with the default compression (zstd-stream,
  manifest version 3, docs/bundle-format.md 5.2) and with `--compression zstd` (version 1,
  one independent zstd frame per 1 MiB chunk);
* `rauc bundle` of the same image (verity format, RAUC's recommended one; a throwaway
  openssl certificate signs it);
* once, as a reference of what compression alone can reach: `zstd -19 --long=27 -T2` of the
  raw image (no chunks, nothing verifiable before the end).

Then the reader side, once per avobuild bundle: `avobuild bundle verify` (wall, peak RSS).
Each run records wall time and peak RSS (GNU time: %e and %M; %M is the peak of the largest
process of the tree, so rauc's figure is its mksquashfs). The medians, sizes and
ratios against rauc are printed as a Markdown table and written with the machine's
description to WORK/results.md and WORK/results.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_image", REPO / "bench" / "image" / "run.py")
assert _spec is not None and _spec.loader is not None
bench_image = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_image)

AVOBUILD = REPO / ".venv" / "bin" / "avobuild"
KEY = REPO / "keys-example" / "insecure-example.key.pem"
PUBLIC = REPO / "keys-example" / "insecure-example.pub.pem"
EPOCH = "1767225600"
IMAGE_SIZE = "640M"


def build_slot_image(work: Path, tree: Path) -> Path:
    image = work / "rootfs.ext4"
    if image.exists():
        return image
    partial = work / "rootfs.ext4.partial"
    partial.unlink(missing_ok=True)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": EPOCH}
    subprocess.run(  # noqa: S603
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-U",
            "6b1e4c8e-0000-4000-8000-000000000001",
            "-E",
            "hash_seed=6b1e4c8e-0000-4000-8000-000000000002,root_owner=0:0",
            "-d",
            str(tree),
            str(partial),
            IMAGE_SIZE,
        ],
        check=True,
        env=env,
    )
    partial.rename(image)
    return image


def timed(argv: list[str], work: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a command, from GNU time."""
    out = work / "time.txt"
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH}
    subprocess.run(  # noqa: S603
        ["/usr/bin/time", "-f", "%e %M", "-o", str(out), *argv],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall, rss = out.read_text().split()[-2:]
    return float(wall), int(rss)


def avobuild_create(image: Path, output: Path, *extra: str) -> list[str]:
    return [
        str(AVOBUILD),
        "bundle",
        "create",
        "--image",
        f"rootfs={image}",
        "--name",
        "bench",
        "--version",
        "1.0.0",
        "--compatible",
        "bench-x86_64",
        "--key",
        str(KEY),
        *extra,
        "-o",
        str(output),
    ]


def rauc_setup(work: Path, image: Path) -> tuple[Path, Path, Path]:
    base = work / "rauc"
    content = base / "content"
    content.mkdir(parents=True, exist_ok=True)
    cert, key = base / "cert.pem", base / "key.pem"
    if not cert.exists():
        subprocess.run(  # noqa: S603
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes"),
                *("-keyout", str(key), "-out", str(cert)),
                *("-days", "3650", "-subj", "/CN=avobuild bench"),
            ],
            check=True,
            capture_output=True,
        )
    linked = content / "rootfs.ext4"
    linked.unlink(missing_ok=True)
    os.link(image, linked)
    (content / "manifest.raucm").write_text(
        "[update]\ncompatible=bench-x86_64\nversion=1.0.0\n\n[bundle]\nformat=verity\n\n"
        "[image.rootfs]\nfilename=rootfs.ext4\n"
    )
    return content, cert, key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench" / "bundle")
    parser.add_argument("--image-work", type=Path, default=REPO / "build" / "bench" / "image")
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tree = bench_image.build_corpus(options.image_work.resolve())
    image = build_slot_image(work, tree)
    content, cert, key = rauc_setup(work, image)
    outputs = {
        "avobuild bundle create (zstd-stream)": work / "stream.avb",
        "avobuild bundle create --compression zstd": work / "chunks.avb",
        "rauc bundle (verity)": work / "bench.raucb",
        "zstd -19 --long=27 -T2 (raw image, reference)": work / "rootfs.ext4.zst",
    }
    commands = {
        "avobuild bundle create (zstd-stream)": avobuild_create(
            image, outputs["avobuild bundle create (zstd-stream)"]
        ),
        "avobuild bundle create --compression zstd": avobuild_create(
            image, outputs["avobuild bundle create --compression zstd"], "--compression", "zstd"
        ),
        "rauc bundle (verity)": [
            "rauc",
            "bundle",
            f"--cert={cert}",
            f"--key={key}",
            str(content),
            str(outputs["rauc bundle (verity)"]),
        ],
        "zstd -19 --long=27 -T2 (raw image, reference)": [
            "zstd",
            "-q",
            "-f",
            "-19",
            "--long=27",
            "-T2",
            str(image),
            "-o",
            str(outputs["zstd -19 --long=27 -T2 (raw image, reference)"]),
        ],
    }
    results: dict[str, list[tuple[float, int]]] = {tool: [] for tool in commands}
    for run in range(options.runs):
        for tool, argv in commands.items():
            if tool.endswith("reference)") and run > 0:
                continue
            outputs[tool].unlink(missing_ok=True)
            results[tool].append(timed(argv, work))
    sizes = {tool: path.stat().st_size for tool, path in outputs.items()}
    verify = {
        tool: timed(
            [str(AVOBUILD), "bundle", "verify", str(outputs[tool]), "--keyring", str(PUBLIC)], work
        )
        for tool in list(commands)[:2]
    }
    medians = {
        tool: (statistics.median(w for w, _ in runs), statistics.median(r for _, r in runs))
        for tool, runs in results.items()
    }
    rauc = "rauc bundle (verity)"
    lines = [
        f"Image: ext4, {image.stat().st_size} bytes ({IMAGE_SIZE}), mke2fs -d of the Debian "
        f"bookworm tree of bench/image ({bench_image.PACKAGES}).",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"load {os.getloadavg()[0]:.2f}; medians of {options.runs} alternating runs "
        "(the zstd reference: one run).",
        "",
        "| tool | size (bytes) | size vs rauc | wall (s) | wall vs rauc | peak RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tool, (wall, rss) in medians.items():
        lines.append(
            f"| {tool} | {sizes[tool]:,} | {sizes[tool] / sizes[rauc]:.2f}x | {wall:.1f} | "
            f"{wall / medians[rauc][0]:.2f}x | {rss / 1024:.0f} |"
        )
    lines += [
        "",
        "| `avobuild bundle verify` of | wall (s) | peak RSS (MB) |",
        "| --- | ---: | ---: |",
    ]
    for tool, (wall, rss) in verify.items():
        lines.append(
            f"| {tool.removeprefix('avobuild bundle create ')} | {wall:.1f} | {rss / 1024:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (work / "results.md").write_text(text)
    (work / "results.json").write_text(
        json.dumps(
            {"sizes": sizes, "runs": results, "medians": medians, "verify": verify}, indent=2
        )
    )
    for tool in (rauc, "zstd -19 --long=27 -T2 (raw image, reference)"):
        outputs[tool].unlink(missing_ok=True)
    shutil.rmtree(content, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
