"""Root filesystems as build systems produce them: hostile trees and tar archives.

Every hazard a real root filesystem holds (device nodes, FIFOs, sockets, absolute and
relative symlinks, hard links, setuid/setgid/sticky bits, owners, extended attributes
including security.capability and POSIX ACLs, empty directories, sparse files) goes through
every target filesystem from a directory and from a tar archive. The oracle is the kernel:
the image is loop-mounted read-only and walked with lstat, readlink and getxattr, and
compared with the same walk of the source tree. A canary directory outside the tree, which
the tree's symlinks point into, must be byte-identical afterwards, and a FIFO in the tree
would block any tool that opened it (an alarm fails the test instead of hanging).

Most tests need root (mknod, chown, security xattrs, loop mounts); CI runs as root. Those
that matter for unprivileged builds run the builder as `nobody` through setpriv.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from conftest import avobuild_cli, write_product

from avobuild.disk.plan import plan_layout
from avobuild.errors import BuildError, RecipeError
from avobuild.fs import build_filesystem, list_ext4_tree, read_ext4_file
from avobuild.fs.overlay import Overlay
from avobuild.model.layout import FsType, Role
from avobuild.model.recipe import load_recipe
from avobuild.model.tree import Ownership, TreeKind, TreeSource

MiB = 1 << 20
ROOT = os.geteuid() == 0
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def python_as_nobody(script: str, *args: Path) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet with this interpreter and this checkout as the user nobody."""
    return subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mknod, chown, loop mounts)")
IMAGE_SIZE = 64 * MiB
FORMATS = [FsType.EXT4, FsType.SQUASHFS, FsType.EROFS]
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
# A POSIX access ACL as the kernel's xattr holds it (version 2, then tag, perm, id entries):
# user::rwx group::r-x group:4:r-x mask::r-x other::r-x
ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in (
        (0x01, 7, 0xFFFFFFFF),
        (0x04, 5, 0xFFFFFFFF),
        (0x08, 5, 4),
        (0x10, 5, 0xFFFFFFFF),
        (0x20, 5, 0xFFFFFFFF),
    )
)

Snapshot = dict[str, tuple[object, ...]]


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Fail instead of hanging when something opens the tree's FIFO."""

    def expired(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: did a tool open a FIFO?")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(root: Path, *, acls: bool = True) -> Snapshot:
    """Everything an image must keep of a tree, read with lstat/readlink/getxattr only."""
    found: Snapshot = {}
    inodes: dict[tuple[int, int], str] = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            if relative == "lost+found":
                continue
            info = path.lstat()
            try:
                names = sorted(os.listxattr(path, follow_symlinks=False))
            except OSError:  # squashfs keeps no xattrs on special files
                names = []
            if not acls:
                names = [n for n in names if not n.startswith("system.posix_acl")]
            xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
            record: list[object] = [
                stat.S_IFMT(info.st_mode),
                stat.S_IMODE(info.st_mode),
                info.st_uid,
                info.st_gid,
                xattrs,
            ]
            if stat.S_ISLNK(info.st_mode):
                record.append(os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                with path.open("rb") as handle:
                    record += [info.st_size, hashlib.sha256(handle.read()).hexdigest()]
                record.append(inodes.setdefault((info.st_dev, info.st_ino), relative))
            elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                record.append((os.major(info.st_rdev), os.minor(info.st_rdev)))
            found[relative] = tuple(record)
    return found


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop,ro", image, mountpoint], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", mountpoint], check=True)


def make_canary(root: Path) -> Path:
    canary = root / "canary"
    canary.mkdir()
    (canary / "file").write_text("the build host's file\n")
    (canary / "lib").mkdir()
    (canary / "lib" / "keep").write_text("keep\n")
    return canary


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for relative, record in sorted(snapshot(root).items()):
        digest.update(repr((relative, record)).encode())
    return digest.hexdigest()


def make_hostile_tree(root: Path, canary: Path, seed: int) -> None:
    """A root filesystem with every hazard; needs root for devices, owners and caps."""
    rng = random.Random(seed)
    root.mkdir()
    root.chmod(0o755)
    for directory in ("dev", "etc", "usr/bin", "usr/lib", "var/log/journal", "tmp", "empty"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    os.mknod(root / "dev/full", stat.S_IFCHR | 0o666, os.makedev(1, 7))
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev/loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mkfifo(root / "dev/initctl", 0o600)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "dev/log"))
    (root / "etc/localtime").symlink_to(canary / "file")  # absolute, out of the tree
    (root / "etc/resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")  # dangling
    (root / "lib").symlink_to("usr/lib")  # relative
    (root / "host").symlink_to(canary)
    for index in range(12):
        data = rng.randbytes(rng.choice([0, 1, 4095, 4096, 70_000, rng.randrange(1, 200_000)]))
        (root / f"usr/bin/tool{index}").write_bytes(data)
        (root / f"usr/bin/tool{index}").chmod(rng.choice([0o755, 0o644, 0o700]))
    (root / "usr/bin/su").write_bytes(rng.randbytes(5000))
    (root / "usr/bin/su").chmod(0o4755)
    (root / "usr/bin/wall").write_bytes(rng.randbytes(3000))
    os.chown(root / "usr/bin/wall", 0, 5)
    (root / "usr/bin/wall").chmod(0o2755)
    os.link(root / "usr/bin/tool1", root / "usr/bin/tool1-again")
    (root / "usr/bin/ping").write_bytes(rng.randbytes(9000))
    (root / "usr/bin/ping").chmod(0o755)
    os.setxattr(root / "usr/bin/ping", "security.capability", CAPABILITY)
    os.setxattr(root / "usr/bin/tool2", "user.origin", b"seeded \xff bytes")
    os.chown(root / "var/log/journal", 0, 999)
    (root / "var/log/journal").chmod(0o2755)
    os.setxattr(root / "var/log/journal", "system.posix_acl_access", ACL)
    with (root / "usr/lib/sparse.img").open("wb") as handle:
        handle.write(b"head")
        handle.seek(8 * MiB)
        handle.write(b"tail")
    os.chown(root / "usr/lib/sparse.img", 1234, 5678)
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    os.chown(root / "etc/shadow", 0, 42)
    (root / "etc/shadow").chmod(0o640)


def tar_of(tree: Path, output: Path, compression: str = "") -> Path:
    """The tree as GNU tar writes it (numeric owners, xattrs as SCHILY records)."""
    plain = output.with_suffix("") if compression else output
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "tar",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--sparse",
            "--sort=name",
            "--exclude=./dev/log",  # tar cannot hold sockets
            "-C",
            tree,
            "-cf",
            plain,
            ".",
        ],
        check=True,
        capture_output=True,
    )
    if compression == "gz":
        subprocess.run(["gzip", "-n", "-k", plain], check=True)
    elif compression == "zst":
        subprocess.run(["zstd", "-q", "-k", plain, "-o", output], check=True)
    elif compression == "xz":
        subprocess.run(["xz", "-k", plain], check=True)
    return output


def overlay_of(root: Path) -> Overlay:
    overlay = Overlay(root)
    overlay.add_file("usr/lib/avobuild/release", b"AVOBUILD_VERSION=1\n")
    overlay.add_file("etc/localtime", b"UTC0\n")  # replaces the symlink out of the tree
    overlay.add_directory("data")
    overlay.add_symlink("etc/systemd/system/multi-user.target.wants/a.service", "/a.service")
    return overlay


def expected_snapshot(source: Snapshot, image_with_additions: Snapshot) -> Snapshot:
    """The source with the additions: they are checked separately, here only applied."""
    expected = dict(source)
    for path in ("usr/lib/avobuild", "usr/lib/avobuild/release", "etc/localtime", "data"):
        expected[path] = image_with_additions[path]
    for path in ("etc/systemd", "etc/systemd/system", "etc/systemd/system/multi-user.target.wants"):
        expected[path] = image_with_additions[path]
    link = "etc/systemd/system/multi-user.target.wants/a.service"
    expected[link] = image_with_additions[link]
    return expected


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not ROOT:
        pytest.skip("needs root")
    base = tmp_path_factory.mktemp("hostile")
    canary = make_canary(base)
    tree = base / "tree"
    make_hostile_tree(tree, canary, 11)
    archive = tar_of(tree, base / "rootfs.tar.zst", "zst")
    return {"base": base, "canary": canary, "tree": tree, "archive": archive}


@needs_root
@pytest.mark.parametrize("kind", [TreeKind.DIRECTORY, TreeKind.ARCHIVE])
@pytest.mark.parametrize("fstype", FORMATS)
def test_everything_a_rootfs_holds_reaches_the_image(
    fstype: FsType, kind: TreeKind, hostile: dict[str, Path], tmp_path: Path
) -> None:
    canary_before = tree_digest(hostile["canary"])
    path = hostile["tree"] if kind is TreeKind.DIRECTORY else hostile["archive"]
    overlay = overlay_of(tmp_path / "additions")
    image = tmp_path / f"rootfs.{fstype}"
    size = IMAGE_SIZE if fstype is FsType.EXT4 else None
    with alarm(180):
        build_filesystem(
            fstype,
            TreeSource(path, kind),
            image,
            size,
            label="rootfs",
            seed="s",
            overlay=overlay.root,
        )
    # squashfs has no POSIX ACLs; a tar archive carries no sockets.
    acls = fstype is not FsType.SQUASHFS
    source = snapshot(hostile["tree"], acls=acls)
    if kind is TreeKind.ARCHIVE:
        del source["dev/log"]
    with mounted(image, tmp_path / "mnt") as root:
        listed = snapshot(root, acls=acls)
        held_acl = (
            os.getxattr(root / "var/log/journal", "system.posix_acl_access") if acls else None
        )
    assert listed == expected_snapshot(source, listed)
    # What the additions are, read back from the image.
    assert listed["usr/lib/avobuild/release"][:4] == (stat.S_IFREG, 0o644, 0, 0)
    assert listed["etc/localtime"][:4] == (stat.S_IFREG, 0o644, 0, 0)
    assert listed["etc/systemd/system/multi-user.target.wants/a.service"][-1] == "/a.service"
    assert listed["usr/bin/ping"][4] == (("security.capability", CAPABILITY),)
    assert listed["dev/full"][-1] == (1, 7) and listed["dev/loop0"][0] == stat.S_IFBLK
    assert listed["usr/bin/tool1-again"][-1] == "usr/bin/tool1"  # one inode
    assert listed["usr/bin/su"][1] == 0o4755 and listed["tmp"][1] == 0o1777
    assert listed["usr/lib/sparse.img"][2:4] == (1234, 5678)
    if held_acl is not None:
        assert held_acl == ACL
    if kind is TreeKind.DIRECTORY:
        assert listed["dev/log"][0] == stat.S_IFSOCK
    # The host is untouched: the canary the symlinks point into, the tree itself.
    assert tree_digest(hostile["canary"]) == canary_before
    assert not (hostile["canary"] / "lib" / "avobuild").exists()


@needs_root
def test_ext4_keeps_holes(hostile: dict[str, Path], tmp_path: Path) -> None:
    for kind, path in (
        (TreeKind.DIRECTORY, hostile["tree"]),
        (TreeKind.ARCHIVE, hostile["archive"]),
    ):
        image = tmp_path / f"{kind}.ext4"
        build_filesystem(
            FsType.EXT4, TreeSource(path, kind), image, IMAGE_SIZE, label="r", seed="s"
        )
        report = subprocess.run(
            ["debugfs", "-R", "stat /usr/lib/sparse.img", image], capture_output=True, text=True
        ).stdout
        blocks = int(report.split("Blockcount: ")[1].split()[0])
        assert blocks <= 16, report  # 512-byte sectors: two 4 KiB blocks, not 8 MiB


@needs_root
@pytest.mark.parametrize("fstype", FORMATS)
def test_ownership_root_makes_every_entry_root_owned(
    fstype: FsType, hostile: dict[str, Path], tmp_path: Path
) -> None:
    image = tmp_path / f"rootfs.{fstype}"
    source = TreeSource(hostile["tree"], TreeKind.DIRECTORY, Ownership.ROOT)
    size = IMAGE_SIZE if fstype is FsType.EXT4 else None
    build_filesystem(fstype, source, image, size, label="r", seed="s")
    with mounted(image, tmp_path / "mnt") as root:
        listed = snapshot(root)
    assert {record[2:4] for record in listed.values()} == {(0, 0)}
    assert listed["usr/bin/su"][1] == 0o4755


@needs_root
@pytest.mark.parametrize("fstype", FORMATS)
def test_every_compression_gives_the_same_image(
    fstype: FsType, hostile: dict[str, Path], tmp_path: Path
) -> None:
    digests = set()
    for compression, name in (
        ("", "r.tar"),
        ("gz", "r.tar.gz"),
        ("xz", "r.tar.xz"),
        ("zst", "r.tar.zst"),
    ):
        archive = tar_of(hostile["tree"], tmp_path / (compression or "plain") / name, compression)
        image = tmp_path / f"{name}.{fstype}"
        size = IMAGE_SIZE if fstype is FsType.EXT4 else None
        build_filesystem(
            fstype, TreeSource(archive, TreeKind.ARCHIVE), image, size, label="r", seed="s"
        )
        digests.add(hashlib.sha256(image.read_bytes()).hexdigest())
    assert len(digests) == 1


def _tar(output: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(output, "w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            info.size = len(data) if data is not None else 0
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return output


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


BAD_ARCHIVES = [
    ("dotdot", [(_member("./etc"), None), (_member("../escape"), b"x")], "'..' in the path"),
    ("absolute", [(_member("/etc/passwd"), b"x")], "absolute path"),
    (
        "below-a-symlink",
        [(_member("lib", tarfile.SYMTYPE, linkname="/tmp"), None), (_member("lib/x"), b"x")],
        "its parent lib is a symlink in the archive",
    ),
    (
        "below-a-file",
        [(_member("etc"), b"file"), (_member("etc/passwd"), b"x")],
        "its parent etc is a file in the archive",
    ),
    ("twice", [(_member("a"), b"1"), (_member("a"), b"2")], "a appears twice"),
    (
        "dangling-hard-link",
        [(_member("b", tarfile.LNKTYPE, linkname="nowhere"), None)],
        "hard link to 'nowhere', which is not an earlier file",
    ),
    ("huge-uid", [(_member("big", uid=1 << 33), b"x")], "uid 8589934592 does not fit 32 bits"),
    ("line-break", [(_member("bad\nname"), b"x")], "line breaks"),
]


@pytest.mark.parametrize(
    ("case", "members", "message"), BAD_ARCHIVES, ids=[c[0] for c in BAD_ARCHIVES]
)
@pytest.mark.parametrize("fstype", FORMATS)
def test_hostile_archives_are_refused_naming_the_member(
    fstype: FsType,
    case: str,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    message: str,
    tmp_path: Path,
) -> None:
    archive = _tar(tmp_path / f"{case}.tar", members)
    out = tmp_path / "out"
    out.mkdir()
    image = out / f"rootfs.{fstype}"
    size = IMAGE_SIZE if fstype is FsType.EXT4 else None
    with pytest.raises(BuildError) as raised:
        build_filesystem(
            fstype, TreeSource(archive, TreeKind.ARCHIVE), image, size, label="r", seed="s"
        )
    text = str(raised.value)
    assert message in text and str(archive) in text and "header at byte" in text, text
    assert not (tmp_path / "escape").exists()
    # Nothing half-written is left beside the output (ext4 keeps the sized file it formats).
    assert [p.name for p in out.iterdir()] in ([], [image.name])


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    good = _tar(tmp_path / "good.tar", [(_member("big"), random.Random(5).randbytes(100_000))])
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(zstandard.ZstdCompressor().compress(good.read_bytes())[:20_000])
    for fstype in FORMATS:
        size = IMAGE_SIZE if fstype is FsType.EXT4 else None
        with pytest.raises(BuildError, match=r"cut.tar.zst: (truncated|not a valid)"):
            build_filesystem(
                fstype,
                TreeSource(cut, TreeKind.ARCHIVE),
                tmp_path / f"x.{fstype}",
                size,
                label="r",
                seed="s",
            )


@pytest.mark.parametrize("fstype", FORMATS)
def test_additions_never_go_below_a_symlink_of_the_tree(fstype: FsType, tmp_path: Path) -> None:
    canary = make_canary(tmp_path)
    before = tree_digest(canary)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "usr").symlink_to(canary)  # the "usr -> HOSTDIR" case
    overlay = Overlay(tmp_path / "additions")
    overlay.add_file("usr/lib/avobuild/release", b"x\n")
    size = IMAGE_SIZE if fstype is FsType.EXT4 else None
    with pytest.raises(
        BuildError, match=rf"/usr/lib/avobuild/release: its parent /usr is a symlink -> {canary}"
    ):
        build_filesystem(
            fstype,
            TreeSource(tree, TreeKind.DIRECTORY),
            tmp_path / "img",
            size,
            label="r",
            seed="s",
            overlay=overlay.root,
        )
    assert tree_digest(canary) == before
    assert not (canary / "lib" / "avobuild").exists()


def test_an_unprivileged_build_of_a_root_owned_archive_is_root_owned(tmp_path: Path) -> None:
    """Run as `nobody`: the archive's owners and device nodes still reach ext4 and squashfs."""
    if not ROOT:
        pytest.skip("needs root to switch to nobody")
    members = [
        (_member("./", tarfile.DIRTYPE), None),
        (_member("./etc", tarfile.DIRTYPE), None),
        (_member("./etc/shadow", uid=0, gid=42, mode=0o640), b"root:*:1:0:::::\n"),
        (_member("./dev", tarfile.DIRTYPE), None),
        (_member("./dev/full", tarfile.CHRTYPE, devmajor=1, devminor=7, mode=0o666), None),
        (_member("./usr", tarfile.DIRTYPE), None),
        (_member("./usr/bin", tarfile.DIRTYPE), None),
        (_member("./usr/bin/su", mode=0o4755), b"\x00" * 100),
    ]
    # pytest's own temporary directories are private to root: nobody needs one of its own.
    work = Path(tempfile.mkdtemp(prefix="avobuild-nobody-"))
    archive = _tar(work / "rootfs.tar", members)
    os.chown(work, 65534, 65534)
    try:
        _build_as_nobody(archive, work, tmp_path)
    finally:
        shutil.rmtree(work)


def _build_as_nobody(archive: Path, work: Path, tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path\n"
        "from avobuild.fs import build_filesystem\n"
        "from avobuild.model.layout import FsType\n"
        "from avobuild.model.tree import TreeSource, TreeKind\n"
        "src = TreeSource(Path(sys.argv[1]), TreeKind.ARCHIVE)\n"
        "out = Path(sys.argv[2])\n"
        "build_filesystem(FsType.EXT4, src, out / 'r.ext4', 16 << 20, label='r', seed='s')\n"
        "build_filesystem(FsType.SQUASHFS, src, out / 'r.squashfs', None, label='r', seed='s')\n"
    )
    python_as_nobody(script, archive, work)
    for fstype in (FsType.EXT4, FsType.SQUASHFS):
        with mounted(work / f"r.{fstype}", tmp_path / "mnt") as root:
            listed = snapshot(root)
        assert listed["etc/shadow"][:4] == (stat.S_IFREG, 0o640, 0, 42), fstype
        assert listed["dev/full"][0] == stat.S_IFCHR and listed["dev/full"][-1] == (1, 7)
        assert listed["usr/bin/su"][1:4] == (0o4755, 0, 0)


# --- through the recipe and the command line, as a user builds ---


def _recipe_with(product_recipe: Path, old: str, new: str) -> None:
    text = product_recipe.read_text()
    assert old in text
    product_recipe.write_text(text.replace(old, new, 1))


def test_a_rootfs_file_replaces_a_symlink_out_of_the_tree_not_its_target(tmp_path: Path) -> None:
    canary = make_canary(tmp_path)
    before = tree_digest(canary)
    product = write_product(tmp_path / "p", seed=31)
    (product.rootfs / "etc" / "localtime").symlink_to(canary / "file")
    zone = tmp_path / "zone"
    zone.write_text("UTC0\n")
    _recipe_with(
        product.recipe,
        "[kernel]",
        f'[[rootfs.file]]\nsource = "{zone}"\ndest = "/etc/localtime"\nmode = "0600"\n\n[kernel]',
    )
    avobuild_cli("image", product.recipe, "-o", tmp_path / "out")
    disk = tmp_path / "out" / "testprod-1.0.0.img"
    rootfs = tmp_path / "rootfs.img"
    plan = plan_layout(load_recipe(product.recipe).layout)
    part = plan.by_role(Role.SYSTEM_A)
    assert part is not None
    with disk.open("rb") as handle:
        handle.seek(part.offset)
        rootfs.write_bytes(handle.read(part.size))
    assert read_ext4_file(rootfs, "/etc/localtime") == b"UTC0\n"
    assert tree_digest(canary) == before
    assert (canary / "file").read_text() == "the build host's file\n"


def test_an_addition_below_a_symlink_fails_the_build_and_writes_nothing(tmp_path: Path) -> None:
    canary = make_canary(tmp_path)
    before = tree_digest(canary)
    product = write_product(tmp_path / "p", seed=32)
    shutil.rmtree(product.rootfs / "etc")
    (product.rootfs / "usr").symlink_to(canary)  # the release file goes to /usr/lib/avobuild
    out = tmp_path / "out"
    result = avobuild_cli("image", product.recipe, "-o", out, check=False)
    assert result.returncode == 5, result.stderr
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert f"/usr/lib/avobuild/release: its parent /usr is a symlink -> {canary}" in message
    assert f"[rootfs] tree {product.rootfs}" in message
    assert tree_digest(canary) == before
    assert not out.exists() or not any(out.iterdir())


def test_a_recipe_builds_from_archives_for_the_rootfs_and_an_extension(tmp_path: Path) -> None:
    product = write_product(tmp_path / "p", seed=33)
    rootfs_archive = tmp_path / "rootfs.tar.gz"
    with tarfile.open(rootfs_archive, "w:gz") as archive:
        archive.add(product.rootfs, arcname=".")
    extension_archive = tmp_path / "ext.tar.xz"
    with tarfile.open(extension_archive, "w:xz") as archive:
        archive.add(product.extension, arcname=".")
    _recipe_with(product.recipe, 'tree = "rootfs"', f'archive = "{rootfs_archive}"')
    _recipe_with(product.recipe, 'tree = "ext"', f'archive = "{extension_archive}"')
    avobuild_cli("image", product.recipe, "-o", tmp_path / "out")
    recipe = load_recipe(product.recipe)
    assert recipe.rootfs.kind is TreeKind.ARCHIVE
    assert recipe.extensions[0].source.kind is TreeKind.ARCHIVE
    disk = tmp_path / "out" / "testprod-1.0.0.img"
    part = plan_layout(recipe.layout).by_role(Role.SYSTEM_A)
    assert part is not None
    rootfs = tmp_path / "rootfs.img"
    with disk.open("rb") as handle:
        handle.seek(part.offset)
        rootfs.write_bytes(handle.read(part.size))
    hostname = (product.rootfs / "etc" / "hostname").read_bytes()
    assert read_ext4_file(rootfs, "/etc/hostname") == hostname
    listed = list_ext4_tree(rootfs)
    assert "usr/lib/extensions/tools.raw" in listed and "usr/lib/avobuild/release" in listed


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("archive", '"nowhere.tar"', "[rootfs] archive: expected an existing tar archive file"),
        ("archive", '"rootfs.zip"', "[rootfs] archive: expected a tar archive named"),
        ("ownership", '"nobody"', '[rootfs] ownership: expected "preserve" or "root"'),
    ],
)
def test_recipe_errors_for_rootfs_inputs(
    key: str, value: str, message: str, tmp_path: Path
) -> None:
    product = write_product(tmp_path / "p", seed=34)
    if key == "archive":
        _recipe_with(product.recipe, 'tree = "rootfs"\n', f"archive = {value}\n")
    else:
        _recipe_with(product.recipe, 'ownership = "root"\n', f"{key} = {value}\n")
    with pytest.raises(RecipeError) as raised:
        load_recipe(product.recipe)
    assert message in str(raised.value)


def test_both_tree_and_archive_is_an_error(tmp_path: Path) -> None:
    product = write_product(tmp_path / "p", seed=35)
    _recipe_with(product.recipe, 'tree = "rootfs"\n', 'tree = "rootfs"\narchive = "x.tar"\n')
    with pytest.raises(RecipeError, match=r"\[rootfs\] tree: expected either tree"):
        load_recipe(product.recipe)


def test_an_unreadable_file_names_the_path(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("needs root to switch to nobody")
    work = Path(tempfile.mkdtemp(prefix="avobuild-nobody-"))
    try:
        tree = work / "tree"
        tree.mkdir()
        (tree / "readable").write_text("x\n")
        (tree / "secret").write_text("root only\n")
        (tree / "secret").chmod(0o600)  # owned by root: nobody cannot read it
        os.chown(work, 65534, 65534)
        os.chown(tree, 65534, 65534)
        os.chown(tree / "readable", 65534, 65534)
        script = (
            "import sys; from pathlib import Path\n"
            "from avobuild.errors import BuildError\n"
            "from avobuild.image.rootfs import read_tree\n"
            "from avobuild.model.recipe import Architecture\n"
            "from avobuild.model.tree import TreeSource, TreeKind\n"
            "try:\n"
            "    source = TreeSource(Path(sys.argv[1]), TreeKind.DIRECTORY)\n"
            "    read_tree(source, Architecture.X86_64)\n"
            "except BuildError as error:\n"
            "    print(error)\n"
        )
        result = python_as_nobody(script, tree)
        assert result.stdout.strip() == f"{tree / 'secret'}: cannot read: Permission denied"
    finally:
        shutil.rmtree(work)
