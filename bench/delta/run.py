"""Delta benchmark: avobuild against xdelta3, zstd --patch-from, bsdiff, casync and RAUC-style
4 KiB block reuse, on the same pair of ~690 MB ext4 images, in the same run.

Usage (from the repository root; `make -f bench/Makefile bench-delta` runs exactly this):

    .venv/bin/python bench/delta/run.py [--work build/bench] [--runs 3] [--skip bsdiff]
        [--corpus wheels|debian] [--arch amd64|arm64] [--fs ext4|erofs]
        [--images OLD.img NEW.img]

`--corpus debian` builds the second corpus (bench/delta/debian.py: two point releases of 24
Debian 12 packages and the kernel, from the Debian archive; `--arch arm64` takes the same
packages built for arm64); `--fs erofs` builds either corpus as uncompressed erofs images
instead of ext4; `--images` measures two prebuilt images instead.

For every tool it records the delta size, the creation wall time and peak RSS, and the apply
wall time and peak RSS (GNU time's %e and %M for the tool's process tree), checks that the
applied image equals the new image, and prints a Markdown table (also written, with the
machine and load, to WORK/results.json and WORK/results.md). Figures are medians over --runs
runs; the slow peers (bsdiff, zstd -19) run once and only with --with-slow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "delta"))

from corpus import build_corpus  # noqa: E402
from debian import ARCHITECTURES, build_debian_corpus  # noqa: E402

from avobuild.bundle.keys import load_private_key  # noqa: E402
from avobuild.bundle.writer import ImageSource, write_bundle  # noqa: E402
from avobuild.model.layout import FsType  # noqa: E402

KEY = REPO / "keys-example" / "insecure-example.key.pem"
PUB = REPO / "keys-example" / "insecure-example.pub.pem"
AVOBUILD = REPO / ".venv" / "bin" / "avobuild"
BLOCK = 4096


@dataclass
class Result:
    tool: str
    command: str
    delta_size: int
    create_seconds: float | None = None
    create_rss_mb: float | None = None
    apply_seconds: float | None = None
    apply_rss_mb: float | None = None
    applied_ok: bool | None = None
    runs: int = 1
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)


def timed(argv: list[str], timeout: float | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a command, from GNU time."""
    report = Path(f"/tmp/bench-delta-time-{os.getpid()}")
    completed = subprocess.run(  # noqa: S603 - fixed argv
        ["/usr/bin/time", "-f", "%e %M", "-o", str(report), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {completed.stderr.decode()[-2000:]}")
    seconds, rss_kb = report.read_text().split()[-2:]
    report.unlink()
    return float(seconds), int(rss_kb) / 1024


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def measure(
    name: str,
    create: list[str],
    apply: list[str] | None,
    delta: Path | None,
    applied: Path | None,
    expected: str,
    runs: int,
    cleanup: list[Path] | None = None,
) -> Result:
    samples: dict[str, list[float]] = {
        "create_s": [],
        "create_mb": [],
        "apply_s": [],
        "apply_mb": [],
    }
    ok = None
    size = 0
    for _ in range(runs):
        for path in cleanup or []:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                missing_ok=True
            )
        seconds, rss = timed(create)
        samples["create_s"].append(seconds)
        samples["create_mb"].append(rss)
        size = delta.stat().st_size if delta is not None else 0
        if apply is not None and applied is not None:
            applied.unlink(missing_ok=True)
            seconds, rss = timed(apply)
            samples["apply_s"].append(seconds)
            samples["apply_mb"].append(rss)
            ok = sha256(applied) == expected
            applied.unlink()
    return Result(
        name,
        " ".join(create) + ("  /  " + " ".join(apply) if apply else ""),
        size,
        statistics.median(samples["create_s"]),
        statistics.median(samples["create_mb"]),
        statistics.median(samples["apply_s"]) if samples["apply_s"] else None,
        statistics.median(samples["apply_mb"]) if samples["apply_mb"] else None,
        ok,
        runs,
        samples=samples,
    )


def full_bundles(work: Path, images: dict[str, Path]) -> dict[str, Path]:
    bundles = {}
    for release, image in images.items():
        # Cached by content: the ext4, erofs and squashfs corpora share the work directory.
        bundle = work / f"{release}-{sha256(image)[:16]}.avb"
        if not bundle.exists():
            write_bundle(
                bundle,
                [ImageSource("rootfs", image)],
                name="bench",
                version="1" if release == "old" else "2",
                compatible="bench-x86_64",
                build_date=1767225600,
                private_key=load_private_key(KEY),
            )
        bundles[release] = bundle
    return bundles


def block_reuse(old: Path, new: Path) -> tuple[int, int, float]:
    """RAUC adaptive-style: target 4 KiB blocks not in the source, zstd -19 compressed."""
    start = time.monotonic()
    seen = set()
    with old.open("rb") as handle:
        while block := handle.read(BLOCK):
            seen.add(hashlib.sha256(block).digest())
    compressor = zstandard.ZstdCompressor(level=19, threads=2)
    missing = 0
    compressed = 0
    with new.open("rb") as handle, compressor.stream_writer(_Counter(), closefd=False) as writer:
        while block := handle.read(BLOCK):
            if hashlib.sha256(block).digest() not in seen:
                writer.write(block)
                missing += len(block)
        writer.flush(zstandard.FLUSH_FRAME)
        compressed = writer.tell()
    return missing, compressed, time.monotonic() - start


class _Counter:
    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def machine() -> dict[str, object]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(int(memory) / 1024 / 1024, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "zstd": subprocess.run(
            ["zstd", "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "xdelta3": subprocess.run(["xdelta3", "-V"], capture_output=True, text=True).stderr.strip()[
            :40
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], help="tool to leave out")
    parser.add_argument("--corpus", choices=("wheels", "debian"), default="wheels")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="amd64")
    parser.add_argument("--fs", choices=("ext4", "erofs", "squashfs"), default="ext4")
    parser.add_argument("--images", nargs=2, type=Path, metavar=("OLD", "NEW"))
    parser.add_argument(
        "--with-slow",
        action="store_true",
        help="also run bsdiff and zstd -19 --patch-from (each takes 15-40 minutes here)",
    )
    args = parser.parse_args()
    if not args.with_slow:
        args.skip += ["bsdiff", "zstd -19"]
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    if args.images:
        images = {"old": args.images[0].resolve(), "new": args.images[1].resolve()}
    elif args.corpus == "debian":
        images = build_debian_corpus(work, FsType(args.fs), args.arch)
    else:
        images = build_corpus(work, FsType(args.fs))
    bundles = full_bundles(work, images)
    old, new = images["old"], images["new"]
    expected = sha256(new)
    out = work / "out"
    out.mkdir(exist_ok=True)
    applied = out / "applied.img"
    results: list[Result] = []

    def run(name: str, *measure_args: object, **options: object) -> None:
        if any(name == skipped or name.startswith(f"{skipped} ") for skipped in args.skip):
            return
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            results.append(measure(name, *measure_args, **options))  # type: ignore[arg-type]
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            results.append(Result(name, "", 0, note=f"failed: {error}"[:300]))

    delta = out / "avobuild-delta.avb"
    run(
        "avobuild (bundle to bundle)",
        [str(AVOBUILD), "delta", "create", "--from", str(bundles["old"]), "--to",
         str(bundles["new"]), "-o", str(delta), "--key", str(KEY), "--workdir", str(out / "w")],
        [str(AVOBUILD), "delta", "apply", str(delta), "--keyring", str(PUB), "--source",
         f"rootfs={old}", "--output", f"rootfs={applied}"],
        delta, applied, expected, args.runs, [out / "w"],
    )  # fmt: skip
    stream = out / "avobuild.stream"
    engine = [sys.executable, str(REPO / "bench" / "delta" / "engine.py")]
    run(
        "avobuild engine, stream v2 (image to stream)",
        [*engine, "encode", str(old), str(new), str(stream), "2"],
        [*engine, "apply", str(stream), str(old), str(applied)],
        stream, applied, expected, args.runs,
    )  # fmt: skip
    run(
        "avobuild engine, stream v1 (zstd only)",
        [*engine, "encode", str(old), str(new), str(stream), "1"],
        [*engine, "apply", str(stream), str(old), str(applied)],
        stream, applied, expected, args.runs,
    )  # fmt: skip
    xdelta = out / "xdelta3.vcdiff"
    run(
        "xdelta3 -e -s (defaults)",
        ["xdelta3", "-e", "-f", "-s", str(old), str(new), str(xdelta)],
        ["xdelta3", "-d", "-f", "-s", str(old), str(xdelta), str(applied)],
        xdelta, applied, expected, args.runs,
    )  # fmt: skip
    run(
        "xdelta3 -9 -B 1 GiB (whole source in window)",
        ["xdelta3", "-e", "-9", "-B", str(1 << 30), "-f", "-s", str(old), str(new), str(xdelta)],
        ["xdelta3", "-d", "-B", str(1 << 30), "-f", "-s", str(old), str(xdelta), str(applied)],
        xdelta, applied, expected, 1,
    )  # fmt: skip
    zst = out / "zstd.patch"
    for level in ("-3", "-19"):
        run(
            f"zstd {level} --long=30 --patch-from",
            ["zstd", "-q", "-f", level, "--long=30", f"--patch-from={old}", str(new), "-o",
             str(zst)],
            ["zstd", "-q", "-f", "-d", "--long=30", f"--patch-from={old}", str(zst), "-o",
             str(applied)],
            zst, applied, expected, args.runs if level == "-3" else 1,
        )  # fmt: skip
    patch = out / "bsdiff.patch"
    run(
        "bsdiff",
        ["timeout", "2400", "bsdiff", str(old), str(new), str(patch)],
        ["bspatch", str(old), str(applied), str(patch)],
        patch, applied, expected, 1,
    )  # fmt: skip
    if "casync" not in args.skip:
        print("== casync", file=sys.stderr, flush=True)
        stores = {release: out / f"casync-{release}.castr" for release in ("old", "new")}
        for store in stores.values():
            shutil.rmtree(store, ignore_errors=True)
        subprocess.run(  # noqa: S603 - fixed argv
            ["casync", "make", "--compression=zstd", f"--store={stores['old']}",
             str(out / "old.caibx"), str(old)], check=True, capture_output=True,
        )  # fmt: skip
        result = measure(
            "casync (new chunks, zstd)",
            ["casync", "make", "--compression=zstd", f"--store={stores['new']}",
             str(out / "new.caibx"), str(new)],
            ["casync", "extract", f"--store={stores['new']}", f"--seed={old}",
             str(out / "new.caibx"), str(applied)],
            None, applied, expected, args.runs, [stores["new"]],
        )  # fmt: skip
        old_chunks = {path.name for path in stores["old"].rglob("*.cacnk")}
        result.delta_size = (out / "new.caibx").stat().st_size + sum(
            path.stat().st_size
            for path in stores["new"].rglob("*.cacnk")
            if path.name not in old_chunks
        )
        result.note = "delta = index + chunks of the new store not in the old store"
        results.append(result)
    if "rauc" not in args.skip:
        print("== RAUC adaptive block reuse", file=sys.stderr, flush=True)
        missing, compressed, seconds = block_reuse(old, new)
        results.append(
            Result(
                "RAUC adaptive (4 KiB block reuse)",
                "computed: target blocks absent from the source, zstd -19",
                compressed,
                note=f"{missing} bytes of new blocks; computed in {seconds:.0f} s "
                "(not RAUC's own code)",
            )
        )
    report = {
        "machine": info,
        "load_average_at_end": os.getloadavg(),
        "full_bundle_size": bundles["new"].stat().st_size,
        "image_size": new.stat().st_size,
        "results": [asdict(result) for result in results],
    }
    (work / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown(report, results)
    (work / "results.md").write_text(table)
    print(table)


def markdown(report: dict[str, object], results: list[Result]) -> str:
    def number(value: float | None, digits: int = 1) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "| tool | delta size (MB) | create (s) | create RSS (MB) | apply (s) | apply RSS (MB) "
        "| applied = new | runs |",
        "|---|---:|---:|---:|---:|---:|:-:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result.tool} | {result.delta_size / 1e6:.2f} | {number(result.create_seconds)} "
            f"| {number(result.create_rss_mb, 0)} | {number(result.apply_seconds)} "
            f"| {number(result.apply_rss_mb, 0)} "
            f"| {'–' if result.applied_ok is None else ('yes' if result.applied_ok else 'NO')} "
            f"| {result.runs} |" + (f" {result.note}" if result.note else "")
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
