"""Delta stream version 2 on real executables: seeded edits of the host's own ELF files
(recompiled code whose call targets moved, relinked sections, patched bytes, renamed
libraries) in ext4 images reproduce the exact target, and bsdiff with the x86 branch filter
is what makes them small.

The oracle is the target image itself (every applied delta must give its bytes), the sizes
of the version 1 stream of the same images, and the refusals of a wrong source.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess
from pathlib import Path

import bsdiff4
import pytest
from elf_edits import host_elf_files, recompile
from hostile_bundles import bsdiff_lz, bz2_of_lz
from hypothesis import given, settings
from hypothesis import strategies as st

from avobuild.bundle.manifest import ImageRef
from avobuild.delta import filters
from avobuild.delta.apply import apply_delta_file
from avobuild.delta.bsdiff import diff_pieces, shares_strings
from avobuild.delta.bspatch import apply_patch
from avobuild.delta.encode import DeltaSummary, encode_delta
from avobuild.delta.files import _normalised
from avobuild.delta.stream import Filter
from avobuild.errors import BundleError

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
IMAGE_SIZE = 24 << 20
EDITS = ("recompiled", "relinked", "patched", "renamed", "grown", "unchanged")


ELF_FILES = host_elf_files(6)


def ref(path: Path) -> ImageRef:
    data = path.read_bytes()
    return ImageRef(len(data), hashlib.sha256(data).hexdigest())


def relink(rng: random.Random, data: bytes) -> bytes:
    """Two sections swapped: a block moved elsewhere in the file."""
    length = rng.randrange(4096, max(4097, len(data) // 5))
    start = rng.randrange(0, len(data) - length)
    block = data[start : start + length]
    rest = data[:start] + data[start + length :]
    where = rng.randrange(len(rest))
    return rest[:where] + block + rest[where:]


def patch_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 200)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def build_images(root: Path, seed: int, edits: list[str]) -> tuple[Path, Path]:
    """old.img and new.img (ext4, mke2fs -d): the ELF files, one edit each in the new one."""
    rng = random.Random(seed)
    old_tree, new_tree = root / "old", root / "new"
    for tree in (old_tree, new_tree):
        (tree / "usr" / "lib").mkdir(parents=True)
    (old_tree / "etc").mkdir()
    (old_tree / "etc" / "version").write_text("1\n")
    (new_tree / "etc").mkdir()
    (new_tree / "etc" / "version").write_text("2\n")
    for index, (source, kind) in enumerate(zip(ELF_FILES, edits, strict=False)):
        data = source.read_bytes()
        name = f"lib{'abcdef'[index]}-{rng.randrange(1 << 32):08x}.so"
        (old_tree / "usr" / "lib" / name).write_bytes(data)
        new_name = name
        if kind == "recompiled":
            data = recompile(rng, data)
        elif kind == "relinked":
            data = relink(rng, data)
        elif kind == "patched":
            data = patch_bytes(rng, data)
        elif kind == "renamed":
            new_name = f"lib{'abcdef'[index]}-{rng.randrange(1 << 32):08x}.so"
            data = recompile(rng, data)
        elif kind == "grown":
            data = data + rng.randbytes(rng.randrange(1, 100_000))
        (new_tree / "usr" / "lib" / new_name).write_bytes(data)
    images = []
    for tree in (old_tree, new_tree):
        image = root / f"{tree.name}.img"
        with image.open("wb") as handle:
            handle.truncate(IMAGE_SIZE)
        subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", tree, image], check=True
        )
        shutil.rmtree(tree)
        images.append(image)
    return images[0], images[1]


def make_delta(
    root: Path, old: Path, new: Path, version: int = 2, *, branch_filters: bool = False
) -> tuple[Path, DeltaSummary]:
    stream = root / f"v{version}{'-filtered' if branch_filters else ''}.delta"
    with stream.open("wb") as output:
        summary = encode_delta(
            old,
            ref(old),
            new,
            ref(new),
            output,
            version=version,
            threads=2,
            branch_filters=branch_filters,
        )
    return stream, summary


def stream_lines(stream: Path, keyword: bytes) -> list[bytes]:
    return re.findall(rb"(?:^|\n)(" + keyword + rb" [^\n]*)", stream.read_bytes())


pytestmark = pytest.mark.skipif(len(ELF_FILES) < 6, reason="needs six x86-64 ELF files")


@settings(max_examples=8)
@given(
    seed=st.integers(0, 2**32 - 1), edits=st.lists(st.sampled_from(EDITS), min_size=6, max_size=6)
)
def test_seeded_elf_edits_reproduce_the_target(
    tmp_path_factory: pytest.TempPathFactory, seed: int, edits: list[str]
) -> None:
    root = tmp_path_factory.mktemp("elf")
    old, new = build_images(root, seed, edits)
    stream, _ = make_delta(root, old, new, branch_filters=seed % 2 == 1)
    assert stream.read_bytes().startswith(b"avobuild-delta 2\n")
    output = root / "out.img"
    apply_delta_file(stream, old, output)
    assert output.read_bytes() == new.read_bytes()
    shutil.rmtree(root)


def test_recompiled_code_is_diffed_with_bsdiff_and_the_x86_filter(tmp_path: Path) -> None:
    old, new = build_images(tmp_path, 5, ["recompiled"] * 6)
    v1, v1_summary = make_delta(tmp_path, old, new, version=1)
    raw, raw_summary = make_delta(tmp_path, old, new)
    v2, v2_summary = make_delta(tmp_path, old, new, branch_filters=True)
    assert v1.read_bytes().startswith(b"avobuild-delta 1\n")
    # Without branch filters (the default) every bspatch is raw.
    assert {line.split(b" ")[3] for line in stream_lines(raw, b"bspatch")} == {b"raw"}
    assert raw_summary.stream_size < 0.9 * v1_summary.stream_size
    bspatches = stream_lines(v2, b"bspatch")
    assert bspatches, "no bspatch operation"
    assert any(line.split(b" ")[3] == b"x86" for line in bspatches), bspatches
    # Every bspatch names the window line before it.
    windows = stream_lines(v2, b"window")
    assert {line.split(b" ")[5] for line in bspatches} <= {line.split(b" ")[5] for line in windows}
    assert v2_summary.stream_size < 0.9 * v1_summary.stream_size, (
        v2_summary.stream_size,
        v1_summary.stream_size,
    )
    for stream in (v1, raw, v2):
        output = tmp_path / f"{stream.stem}.img"
        apply_delta_file(stream, old, output)
        assert output.read_bytes() == new.read_bytes()


def test_renamed_library_is_paired_by_its_normalised_name(tmp_path: Path) -> None:
    assert _normalised("usr/lib/libavcodec-402e4b05.so.59") == "usr/lib/libavcodec.so.#"
    assert _normalised("lib/modules/6.1.0-50-amd64/x.ko") == "lib/modules/#.#.#-#-amd#/x.ko"
    old, new = build_images(tmp_path, 9, ["renamed"] * 6)
    stream, summary = make_delta(tmp_path, old, new)
    assert summary.op_counts["bspatch"] >= 1
    output = tmp_path / "out.img"
    apply_delta_file(stream, old, output)
    assert output.read_bytes() == new.read_bytes()


def test_a_version_2_delta_refuses_any_other_source(tmp_path: Path) -> None:
    old, new = build_images(tmp_path, 3, ["recompiled", "patched"] * 3)
    stream, _ = make_delta(tmp_path, old, new)
    other = tmp_path / "other.img"
    data = bytearray(old.read_bytes())
    data[len(data) // 2] ^= 1
    other.write_bytes(bytes(data))
    output = tmp_path / "out.img"
    with pytest.raises(BundleError, match="is not the source this delta was made from"):
        apply_delta_file(stream, other, output)
    assert not output.exists()
    assert not list(tmp_path.glob(".out.img*"))


def test_a_damaged_window_or_bspatch_is_refused(tmp_path: Path) -> None:
    old, new = build_images(tmp_path, 4, ["recompiled"] * 6)
    stream, _ = make_delta(tmp_path, old, new, branch_filters=True)
    data = stream.read_bytes()
    match = re.search(rb"\nextent (\d+) ", data)
    assert match is not None
    moved = data[: match.start(1)] + str(int(match.group(1)) + 4096).encode() + data[match.end(1) :]
    payload = re.search(rb"\nbspatch [^\n]*\n", data)
    assert payload is not None
    flipped = bytearray(data)
    flipped[payload.end() + 40] ^= 0x10
    for name, damaged, message in (
        ("moved", moved, "window's source bytes do not match"),
        ("flipped", bytes(flipped), "bsdiff patch|patched bytes do not match"),
    ):
        bad = tmp_path / f"{name}.delta"
        bad.write_bytes(damaged)
        output = tmp_path / f"{name}.img"
        with pytest.raises(BundleError, match=message):
            apply_delta_file(bad, old, output)
        assert not output.exists()


def test_documented_busybox_applier_applies_version_2(tmp_path: Path) -> None:
    """The script of docs/delta-format.md (busybox sh, dd, zstd, bspatch, /usr/bin/xz)
    rebuilds the exact target from a version 2 stream with x86-filtered bspatch ops."""
    old, new = build_images(tmp_path, 5, ["recompiled"] * 6)
    stream, summary = make_delta(tmp_path, old, new, branch_filters=True)
    assert summary.op_counts["bspatch"] >= 1
    assert any(line.split(b" ")[3] == b"x86" for line in stream_lines(stream, b"bspatch"))
    text = (REPO / "docs" / "delta-format.md").read_text()
    match = re.search(r"<!-- delta-apply-example -->\n```sh\n(.*?)```", text, re.DOTALL)
    assert match is not None
    script = tmp_path / "apply-delta.sh"
    script.write_text(match.group(1))
    output = tmp_path / "out.img"
    with stream.open("rb") as stdin:
        result = subprocess.run(
            [BUSYBOX, "sh", script, old, output, tmp_path / "work"],
            stdin=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "applied"
    assert output.read_bytes()[: new.stat().st_size] == new.read_bytes()


def test_in_process_x86_filter_equals_the_xz_cli(tmp_path: Path) -> None:
    """The encoder and the host applier filter x86 code with Python's liblzma; a device runs
    `xz --x86=start=S`: both directions must give the same bytes as the xz CLI, at any start."""
    data = ELF_FILES[0].read_bytes()[: 3 << 20]
    for start in (0, 4096, 123457):
        forward = filters.forward(data, Filter.X86, start)
        by_cli = subprocess.run(
            ["xz", "--format=raw", f"--x86=start={start}", "--lzma2=preset=0", "-c"],
            input=data,
            capture_output=True,
            check=True,
        ).stdout
        by_cli = subprocess.run(
            ["xz", "-d", "--format=raw", "--lzma2=preset=0", "-c"],
            input=by_cli,
            capture_output=True,
            check=True,
        ).stdout
        assert forward == by_cli
        assert forward != data
        wrapped = filters.wrap_lzma2(forward)
        assert filters.inverse(wrapped, Filter.X86, start, len(data)) == data
        back = subprocess.run(
            ["xz", "-d", "--format=raw", f"--x86=start={start}", "--lzma2=preset=0", "-c"],
            input=wrapped,
            capture_output=True,
            check=True,
        ).stdout
        assert back == data
    wrapped = filters.wrap_lzma2(filters.forward(data, Filter.X86, 0))
    with pytest.raises(BundleError, match="bytes, expected"):
        filters.inverse(wrapped, Filter.X86, 0, len(data) - 1)
    with pytest.raises(BundleError, match="one LZMA2 stream"):
        filters.inverse(wrapped + b"\0", Filter.X86, 0, len(data))
    with pytest.raises(BundleError, match="inverse filter"):
        filters.inverse(wrapped[:-1], Filter.X86, 0, len(data))


def test_one_diff_cut_into_pieces_applies_piece_by_piece_with_bspatch(tmp_path: Path) -> None:
    """A group's single bsdiff is cut into one BSDIFFLZ patch per piece: rewritten as
    BSDIFF40 by the tests' own converter, Debian's bspatch (what a device runs) turns the
    shared window into each piece exactly, whatever the cuts (inside a match, inside
    inserted bytes, one-byte pieces)."""
    rng = random.Random(15)
    old = ELF_FILES[1].read_bytes()[: 1 << 20]
    new = bytearray(recompile(rng, old) if len(old) > 8192 else old)
    for _ in range(100):
        new[rng.randrange(len(new))] = rng.randrange(256)
    start = rng.randrange(len(new) // 2)
    new = new[:start] + rng.randbytes(5000) + new[start:] + old[:3000]
    cuts = sorted({*rng.sample(range(1, len(new)), 12), 1, len(new) - 1})
    pieces = [bytes(new[a:b]) for a, b in zip([0, *cuts], [*cuts, len(new)], strict=True)]
    patches = [patch for patch in diff_pieces(old, pieces) if patch is not None]
    assert len(patches) == len(pieces)
    window = tmp_path / "window"
    window.write_bytes(old)
    for index, (piece, patch) in enumerate(zip(pieces, patches, strict=True)):
        assert patch.startswith(b"BSDIFFLZ")
        (tmp_path / "patch").write_bytes(bz2_of_lz(patch))
        subprocess.run(
            ["bspatch", str(window), str(tmp_path / "out"), str(tmp_path / "patch")], check=True
        )
        assert (tmp_path / "out").read_bytes() == piece, index
    # Cut patches cost little more than one patch of the whole.
    assert sum(map(len, patches)) < len(bsdiff4.diff(old, bytes(new))) + 200 * len(pieces)


def _lz_patch() -> tuple[bytes, bytes, bytes]:
    """A window, a seeded edit of it and the BSDIFFLZ patch between them."""
    rng = random.Random(21)
    old = ELF_FILES[0].read_bytes()[: 1 << 16]
    new = bytearray(recompile(rng, old) if len(old) > 8192 else old)
    new[100:100] = rng.randbytes(300)
    patch = diff_pieces(old, [bytes(new)])[0]
    assert patch is not None and patch.startswith(b"BSDIFFLZ")
    return old, bytes(new), patch


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.data())
def test_bspatch_reader_refuses_or_reproduces_any_damaged_patch(data: st.DataObject) -> None:
    """Fuzz: a BSDIFFLZ patch with bytes flipped, cut or appended anywhere is refused with
    a BundleError or still produces exactly the declared number of bytes (raw LZMA2 has no
    checksum: the operation's sha256 then refuses them); never another exception."""
    old, new, patch = _LZ_PATCH
    damaged = bytearray(patch)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "append"]))
        if not damaged:
            kind = "append"
        if kind == "flip":
            at = data.draw(st.integers(0, len(damaged) - 1))
            damaged[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del damaged[data.draw(st.integers(0, len(damaged) - 1)) :]
        else:
            damaged += data.draw(st.binary(min_size=1, max_size=16))
    try:
        out = apply_patch(old, bytes(damaged), len(new), "fuzz")
    except BundleError:
        return
    assert len(out) == len(new)


_LZ_PATCH = _lz_patch()


def test_bspatch_reader_bounds_every_stream_before_applying() -> None:
    """Each stream is decoded only up to its bound (docs/delta-format.md, 7.5): a diff
    stream of 64 MiB of zeros (10 KB of LZMA2, 11 KB of bzip2) for a 64 KiB operation is
    refused in both formats without being decoded, as is a control stream over the bound;
    the BSDIFF40 rewrite of a good patch gives the same bytes as the patch."""
    old, new, patch = _LZ_PATCH
    assert apply_patch(old, bz2_of_lz(patch), len(new), "x") == new
    bomb = bytes(64 << 20)
    control, diff, extra = bsdiff4.core.diff(old, new)
    for payload, message in (
        (bsdiff_lz(len(new), control, bomb, extra), "diff stream decodes to over"),
        (bz2_of_lz(bsdiff_lz(len(new), control, bomb, extra)), "diff stream decodes to over"),
        (
            bsdiff_lz(len(new), control + bytes(len(new) + 48), diff, extra),
            "control stream .* over",
        ),
        (bsdiff_lz(len(new), control, diff, extra + b"x"), "extra stream decodes to over"),
        (bsdiff_lz(len(new) - 1, control, diff, extra), "not a BSDIFFLZ or BSDIFF40"),
    ):
        assert len(payload) < 64 << 10
        with pytest.raises(BundleError, match=message):
            apply_patch(old, payload, len(new), "x")


def test_shares_strings_finds_shared_bytes_and_none_in_unrelated_random_data() -> None:
    rng = random.Random(41)
    old = rng.randbytes(6 << 20)
    assert not shares_strings(old, rng.randbytes(1 << 20))
    assert shares_strings(old, old[1_000_000 : 1_000_000 + (512 << 10)] + rng.randbytes(512 << 10))
    # Too short to probe: always tried.
    assert shares_strings(old, rng.randbytes(256))


def test_compressed_data_sharing_nothing_is_not_given_to_bsdiff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of high-entropy bytes replaced by other high-entropy bytes (what a new kernel
    image or .gz is) never reaches bsdiff; the recompiled library next to it does. The bsdiff
    processes are forked, so they log what they were given to a file."""
    import avobuild.delta.encode as encode_module

    log = tmp_path / "diffed"

    def logged(old: bytes, pieces: list[bytes]) -> list[bytes | None]:
        with log.open("ab") as handle:
            for piece in pieces:
                handle.write(piece[:64].hex().encode() + b"\n")
        return diff_pieces(old, pieces)

    monkeypatch.setattr(encode_module, "diff_pieces", logged)
    rng = random.Random(12)
    libraries = [path.read_bytes() for path in ELF_FILES]
    images = []
    for name in ("old", "new"):
        tree = tmp_path / f"{name}-tree"
        (tree / "usr" / "lib").mkdir(parents=True)
        for index, data in enumerate(libraries):
            edited = data if name == "old" else recompile(rng, data)
            (tree / "usr" / "lib" / f"lib{'abcdef'[index]}.so").write_bytes(edited)
        (tree / "boot").mkdir()
        (tree / "boot" / "kernel").write_bytes(rng.randbytes(3 << 20))
        image = tmp_path / f"{name}.img"
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", tree, image,
                        str(IMAGE_SIZE >> 10)], check=True)  # fmt: skip
        images.append(image)
    old, new = images
    stream, summary = make_delta(tmp_path, old, new)
    diffed = log.read_bytes().splitlines()
    assert summary.op_counts["bspatch"] >= 1 and diffed
    kernel = (tmp_path / "new-tree" / "boot" / "kernel").read_bytes()
    assert not [head for head in diffed if bytes.fromhex(head.decode()) in kernel]
    output = tmp_path / "out.img"
    apply_delta_file(stream, old, output)
    assert output.read_bytes() == new.read_bytes()
