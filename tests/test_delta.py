"""Delta engine: seeded edits always reproduce the exact target; bad input is refused.

The oracle is the target file itself: every applied delta must give its bytes exactly. The
busybox-sh applier of docs/delta-format.md is run against the same streams, so the format
stays appliable on a device with only dd and zstd.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avobuild.bundle.manifest import ImageRef
from avobuild.delta.apply import apply_delta_file
from avobuild.delta.encode import DeltaSummary, encode_delta
from avobuild.delta.plan import ExtentKind, plan_delta
from avobuild.errors import BundleError

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
EDITS = ("insert", "delete", "move", "overwrite", "zero", "truncate", "grow")


def ref(path: Path) -> ImageRef:
    data = path.read_bytes()
    return ImageRef(len(data), hashlib.sha256(data).hexdigest())


def make_source(rng: random.Random, size: int) -> bytearray:
    """Blocks of random bytes, text-like runs and zeros, like a small filesystem image."""
    data = bytearray()
    while len(data) < size:
        choice = rng.random()
        length = rng.randrange(1, 5) * 4096
        if choice < 0.5:
            data += rng.randbytes(length)
        elif choice < 0.8:
            words = [rng.choice([b"alpha", b"beta", b"gamma", b"delta\n"]) for _ in range(length)]
            data += b" ".join(words)[:length]
        else:
            data += bytes(length)
    return data[:size]


def edit(rng: random.Random, data: bytearray, kind: str) -> bytearray:
    out = bytearray(data)
    position = rng.randrange(len(out))
    length = rng.randrange(1, 40_000)
    if kind == "insert":
        out[position:position] = rng.randbytes(length)
    elif kind == "delete":
        del out[position : position + length]
    elif kind == "move":
        piece = out[position : position + length]
        del out[position : position + length]
        where = rng.randrange(len(out) + 1)
        out[where:where] = piece
    elif kind == "overwrite":
        out[position : position + length] = rng.randbytes(len(out[position : position + length]))
    elif kind == "zero":
        out[position : position + length] = bytes(len(out[position : position + length]))
    elif kind == "truncate":
        del out[rng.randrange(1, len(out)) :]
    elif kind == "grow":
        out += rng.randbytes(length) + bytes(rng.randrange(0, 3) * 4096)
    return out


def make_delta(
    tmp_path: Path, source: bytes, target: bytes, **options: int
) -> tuple[Path, Path, Path, DeltaSummary]:
    source_path = tmp_path / "source.img"
    target_path = tmp_path / "target.img"
    stream_path = tmp_path / "delta.stream"
    source_path.write_bytes(source)
    target_path.write_bytes(target)
    settings = {"level": 9, "extent_size": 16384, "dictionary_size": 65536} | options
    with stream_path.open("wb") as stream:
        summary = encode_delta(
            source_path, ref(source_path), target_path, ref(target_path), stream, **settings
        )
    return source_path, target_path, stream_path, summary


@pytest.mark.parametrize("seed", range(12))
def test_seeded_edits_reproduce_the_target(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    source = make_source(rng, rng.randrange(20_000, 400_000))
    target = source
    kinds = [EDITS[seed % len(EDITS)], *rng.sample(EDITS, rng.randrange(0, 4))]
    for kind in kinds:
        target = edit(rng, target, kind)
    source_path, target_path, stream, _ = make_delta(tmp_path, bytes(source), bytes(target))
    output = tmp_path / "out.img"
    produced = apply_delta_file(stream, source_path, output)
    assert output.read_bytes() == target_path.read_bytes(), kinds
    assert produced == ref(target_path)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (b"", b"new image from nothing" * 1000),
        (b"old" * 5000, b""),
        (bytes(8192), bytes(8192)),
        (b"x" * 4095, b"y" * 4097),
    ],
    ids=["empty-source", "empty-target", "all-zero", "partial-blocks"],
)
def test_edge_cases(tmp_path: Path, source: bytes, target: bytes) -> None:
    source_path, _, stream, _ = make_delta(tmp_path, source, target)
    output = tmp_path / "out.img"
    apply_delta_file(stream, source_path, output)
    assert output.read_bytes() == target


def test_moved_blocks_are_copied_and_zeros_are_zeroed(tmp_path: Path) -> None:
    rng = random.Random(7)
    blocks = [rng.randbytes(4096) for _ in range(64)]
    source = b"".join(blocks)
    target = b"".join(reversed(blocks[:32])) + bytes(16 * 4096) + b"".join(blocks[32:48])
    source_path, _, stream, summary = make_delta(tmp_path, source, target)
    assert summary.op_bytes["copy"] == 48 * 4096
    assert summary.op_bytes["zero"] == 16 * 4096
    assert summary.op_bytes["data"] + summary.op_bytes["patch"] == 0
    assert summary.stream_size < 10_000
    output = tmp_path / "out.img"
    apply_delta_file(stream, source_path, output)
    assert output.read_bytes() == target


def test_similar_content_becomes_a_small_patch(tmp_path: Path) -> None:
    """Content shifted by a few bytes matches no block but patches against its old place."""
    rng = random.Random(8)
    source = rng.randbytes(300_000)
    target = source[:100_000] + b"inserted" + source[100_000:]
    source_path, _, stream, summary = make_delta(tmp_path, source, target)
    assert summary.op_counts["patch"] >= 1
    assert summary.stream_size < 20_000
    output = tmp_path / "out.img"
    apply_delta_file(stream, source_path, output)
    assert output.read_bytes() == target


def test_plan_tiles_the_target(tmp_path: Path) -> None:
    rng = random.Random(9)
    source = make_source(rng, 200_000)
    target = edit(rng, edit(rng, source, "insert"), "zero")
    (tmp_path / "s").write_bytes(source)
    (tmp_path / "t").write_bytes(target)
    extents = plan_delta(tmp_path / "s", len(source), tmp_path / "t", len(target))
    position = 0
    for extent in extents:
        assert extent.offset == position
        position = extent.end
        if extent.kind is ExtentKind.COPY:
            assert (
                source[extent.source_offset : extent.source_offset + extent.length]
                == target[extent.offset : extent.end]
            )
    assert position == len(target)


def test_wrong_source_is_refused_before_the_output_exists(tmp_path: Path) -> None:
    rng = random.Random(10)
    source = rng.randbytes(50_000)
    source_path, _, stream, _ = make_delta(tmp_path, source, source[::-1])
    source_path.write_bytes(source[:-1] + b"!")
    output = tmp_path / "out.img"
    with pytest.raises(BundleError, match="not the source this delta was made from"):
        apply_delta_file(stream, source_path, output)
    assert not output.exists()
    assert not list(tmp_path.glob(".out.img*"))


@pytest.mark.parametrize("damage", ["truncate", "flip-payload", "bad-line", "trailing"])
def test_damaged_stream_is_refused(tmp_path: Path, damage: str) -> None:
    rng = random.Random(11)
    source = make_source(rng, 100_000)
    target = edit(rng, source, "overwrite")
    source_path, _, stream, _ = make_delta(tmp_path, bytes(source), bytes(target))
    data = bytearray(stream.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 20]
    elif damage == "flip-payload":
        match = re.search(rb"\n(data|patch) [^\n]*\n", data)
        assert match is not None
        data[match.end() + 8] ^= 0x40
    elif damage == "bad-line":
        data = data.replace(b"\ncopy ", b"\nkopy ", 1)
        if b"kopy" not in data:
            data = data.replace(b"\nend ", b"\nend 0", 1)
    else:
        data += b"x"
    stream.write_bytes(bytes(data))
    output = tmp_path / "out.img"
    with pytest.raises(BundleError):
        apply_delta_file(stream, source_path, output)
    assert not output.exists()


def shell_applier(tmp_path: Path) -> Path:
    text = (REPO / "docs" / "delta-format.md").read_text()
    match = re.search(r"<!-- delta-apply-example -->\n```sh\n(.*?)```", text, re.DOTALL)
    assert match is not None, "docs/delta-format.md lost its applier script"
    script = tmp_path / "apply-delta.sh"
    script.write_text(match.group(1))
    return script


@pytest.mark.parametrize("seed", range(3))
def test_busybox_shell_applier_matches(tmp_path: Path, seed: int) -> None:
    """The documented busybox sh + dd + zstd applier rebuilds the exact target."""
    rng = random.Random(100 + seed)
    source = make_source(rng, 300_000)
    target = source
    for kind in rng.sample(EDITS, 3):
        target = edit(rng, target, kind)
    source_path, target_path, stream, summary = make_delta(tmp_path, bytes(source), bytes(target))
    assert summary.op_counts["patch"] + summary.op_counts["data"] >= 1
    output = tmp_path / "out.img"
    with stream.open("rb") as stdin:
        result = subprocess.run(
            [BUSYBOX, "sh", shell_applier(tmp_path), source_path, output, tmp_path / "work"],
            stdin=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "applied"
    assert output.read_bytes()[: len(target)] == target_path.read_bytes()


def test_busybox_shell_applier_refuses_wrong_source(tmp_path: Path) -> None:
    rng = random.Random(200)
    source = make_source(rng, 100_000)
    source_path, _, stream, _ = make_delta(
        tmp_path, bytes(source), bytes(edit(rng, source, "grow"))
    )
    source_path.write_bytes(bytes(len(source)))
    output = tmp_path / "out.img"
    with stream.open("rb") as stdin:
        result = subprocess.run(
            [BUSYBOX, "sh", shell_applier(tmp_path), source_path, output, tmp_path / "work"],
            stdin=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
    assert result.returncode != 0
    assert "wrong source image" in result.stderr
    assert not output.exists()


def test_bench_engine_script_smoke(tmp_path: Path) -> None:
    """bench/delta/engine.py (what the benchmark times) round-trips small images."""
    rng = random.Random(300)
    source = make_source(rng, 120_000)
    (tmp_path / "old.img").write_bytes(bytes(source))
    (tmp_path / "new.img").write_bytes(bytes(edit(rng, source, "move")))
    script = REPO / "bench" / "delta" / "engine.py"
    for args in (
        ("encode", "old.img", "new.img", "d.stream"),
        ("apply", "d.stream", "old.img", "applied.img"),
    ):
        subprocess.run([sys.executable, script, *args], cwd=tmp_path, check=True)
    assert (tmp_path / "applied.img").read_bytes() == (tmp_path / "new.img").read_bytes()
