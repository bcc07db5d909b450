"""Two readers, one verdict: every bundle of a seeded hostile corpus (tests/hostile_corpus.py)
goes through the Python reader (`install_bundle` into a disk image) and through the rendered
shell applier (`avocado-update apply` on a simulated device), and both must accept or both
refuse. After every refusal, the disk (slots, ESP with the boot state, data partition) and
the applier's boot state file are byte-identical to before; after an acceptance, nothing but
the inactive slot and the boot state changed.

The device is a small factory image (2 MiB slots), so that hashing and restoring it per case
costs little; it is restored from its pristine copy only when a case changed it.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hostile_bundles import ecdsa_signer, ed25519_signer, make_delta
from hostile_corpus import Case, Context, build_corpus

from avobuild.applier.render import SCRIPT_PATH, render_applier
from avobuild.boot.state import BOOT_STATE_PATH
from avobuild.bundle.keys import load_private_key
from avobuild.disk.plan import DiskPlan, plan_layout
from avobuild.errors import AvobuildError
from avobuild.fs import read_vfat_file
from avobuild.image.factory import build_factory_image
from avobuild.model.layout import Role
from avobuild.model.recipe import load_recipe
from avobuild.update.install import install_bundle

REPO = Path(__file__).resolve().parent.parent
TRUSTED_KEY = REPO / "keys-example" / "insecure-example.key.pem"

LAYOUT = """\
[disk]
table = "gpt"
sector-size = 512
alignment = "1M"

[partition.boot]
role = "boot"
type = "esp"
filesystem = "vfat"
size = "2M"

[partition.system-a]
role = "system-a"
type = "root-x86-64"
filesystem = "ext4"
size = "2M"

[partition.system-b]
role = "system-b"
type = "root-x86-64"
filesystem = "ext4"
size = "2M"

[partition.data]
role = "data"
type = "linux-generic"
filesystem = "ext4"
size = "1M"
"""

RECIPE = f"""\
[product]
name = "diffprod"
version = "1.0.0"
compatible = "diffprod-x86_64"
architecture = "x86_64"
layout = "layout.toml"

[rootfs]
tree = "rootfs"

[data]
tree = "data"

# No kernel: only the boot state matters to the readers under test.
[boot]
method = "external"

[signing]
key = "{TRUSTED_KEY}"

[applier]
keys = ["trusted/release.pub.pem", "trusted/second.pub.pem"]
"""


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_range(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


@dataclass(frozen=True)
class Product:
    root: Path
    factory: Path
    grubenv: bytes
    rendered: Path
    keyring: Path
    plan: DiskPlan
    path: str  # PATH with busybox applets, openssl, zstd and bspatch only
    context: Context


def _busybox_path(directory: Path) -> str:
    directory.mkdir()
    busybox = shutil.which("busybox")
    assert busybox is not None
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        (directory / applet).symlink_to(busybox)
    for tool in ("openssl", "zstd", "bspatch"):
        found = shutil.which(tool)
        assert found is not None
        (directory / tool).unlink(missing_ok=True)
        (directory / tool).symlink_to(found)
    return str(directory)


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> Product:
    root = tmp_path_factory.mktemp("differential")
    (root / "layout.toml").write_text(LAYOUT)
    (root / "product.toml").write_text(RECIPE)
    rng = random.Random(12)
    for tree in ("rootfs", "data"):
        (root / tree / "etc").mkdir(parents=True)
        (root / tree / "etc" / "hostname").write_text(f"{tree}\n")
        (root / tree / "blob.bin").write_bytes(rng.randbytes(300_000))
    trusted_private = load_private_key(TRUSTED_KEY)
    assert isinstance(trusted_private, ed25519.Ed25519PrivateKey)
    ecdsa_private = ec.derive_private_key(rng.getrandbits(200), ec.SECP256R1())
    untrusted = ed25519.Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    trusted = root / "trusted"
    trusted.mkdir()
    for name, key in (("release", trusted_private), ("second", ecdsa_private)):
        (trusted / f"{name}.pub.pem").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    recipe = load_recipe(root / "product.toml")
    factory = build_factory_image(recipe, root / "out", root / "work").path
    rendered = root / "rendered"
    render_applier(recipe, rendered)  # the production applier: no test hooks
    plan = plan_layout(recipe.layout)
    boot, slot_a, slot_b = (
        plan.by_role(role) for role in (Role.BOOT, Role.SYSTEM_A, Role.SYSTEM_B)
    )
    assert boot is not None and slot_a is not None and slot_b is not None
    source = read_range(factory, slot_a.offset, 1 << 20)
    context = Context(
        trusted=ed25519_signer(trusted_private),
        trusted_ecdsa=ecdsa_signer(ecdsa_private),
        untrusted=ed25519_signer(untrusted),
        ecdsa_private=ecdsa_private,
        image=rng.randbytes(300_000),
        slot_size=slot_b.size,
        delta=make_delta(source, random.Random(1)),
        delta_data_last=make_delta(source, random.Random(2), data_last=True),
        rng=random.Random(3),
    )
    return Product(
        root,
        factory,
        read_vfat_file(factory, boot.offset, BOOT_STATE_PATH),
        rendered,
        trusted,
        plan,
        _busybox_path(root / "bin"),
        context,
    )


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    detail: str


class Readers:
    """The Python installer on one disk copy, the shell applier on a simulated device."""

    def __init__(self, product: Product, root: Path) -> None:
        self.product = product
        root.mkdir()
        self.root = root
        self.pristine = file_sha256(product.factory)
        self.python_disk = root / "python.img"
        self.shell_disk = root / "device.img"
        self.grubenv = root / "grubenv"
        self.state = root / "state"
        for disk in (self.python_disk, self.shell_disk):
            shutil.copyfile(product.factory, disk)
        self.grubenv.write_bytes(product.grubenv)
        proc = root / "proc"
        proc.mkdir()
        (proc / "cmdline").write_text("ro avo.slot=A\n")
        self.env = {
            "PATH": product.path,
            "AVO_DISK": str(self.shell_disk),
            "AVO_GRUBENV": str(self.grubenv),
            "AVO_STATE_DIR": str(self.state),
            "AVO_CONF_DIR": str(product.rendered / "etc" / "avocado"),
            "AVO_PROC": str(proc),
            "AVO_SYS": str(root / "sys"),
            "AVO_TMPDIR": str(root),
            "AVO_NO_REBOOT": "1",
        }
        slot_b = product.plan.by_role(Role.SYSTEM_B)
        boot = product.plan.by_role(Role.BOOT)
        assert slot_b is not None and boot is not None
        self.slot_b = (slot_b.offset, slot_b.size)
        self.boot = (boot.offset, boot.size)

    def python(self, bundle: Path) -> Verdict:
        try:
            install_bundle(bundle, self.python_disk, self.product.keyring)
        except AvobuildError as error:
            return Verdict(False, str(error))
        return Verdict(True, "installed")

    def shell(self, bundle: Path, *, streaming: bool = False) -> Verdict:
        script = self.product.rendered / SCRIPT_PATH
        source = ["-"] if streaming else ["--bundle", str(bundle)]
        result = subprocess.run(
            [f"{self.product.path}/sh", str(script), "apply", "--target", "inactive", *source],
            input=bundle.read_bytes() if streaming else None,
            capture_output=True,
            env=self.env,
            check=False,
        )
        stderr = result.stderr.decode("latin-1").strip()
        # 3: refused (format, signature), 4: incompatible; anything else is not a verdict.
        # From a pipe, a fault found after the first write stops the install with 1.
        verdicts = (0, 1, 3, 4) if streaming else (0, 3, 4)
        assert result.returncode in verdicts, f"{bundle.name}: exit {result.returncode}: {stderr}"
        return Verdict(result.returncode == 0, stderr)

    def unchanged_outside(self, disk: Path, *regions: tuple[int, int]) -> bool:
        """The disk equals the factory image everywhere but in `regions`."""
        edges = sorted(regions)
        position = 0
        with disk.open("rb") as handle, self.product.factory.open("rb") as factory:
            for offset, size in [*edges, (disk.stat().st_size, 0)]:
                handle.seek(position)
                factory.seek(position)
                if handle.read(offset - position) != factory.read(offset - position):
                    return False
                position = offset + size
        return True

    def judge(
        self, name: str, data: bytes, *, streaming: bool = False
    ) -> tuple[Verdict, Verdict, list[str]]:
        """Both verdicts on one case, and what either reader changed that it must not have.
        `streaming`: the shell reads the bundle from a pipe, so a refusal may leave slot B
        half written (never anything else: the boot state does not change either, since the
        factory's slot B is no boot candidate to begin with)."""
        bundle = self.root / "case.avb"
        bundle.write_bytes(data)
        problems: list[str] = []
        python = self.python(bundle)
        if file_sha256(self.python_disk) != self.pristine:
            if not python.accepted:
                problems.append(f"{name}: {PYTHON_WROTE}")
            elif not self.unchanged_outside(self.python_disk, self.slot_b, self.boot):
                problems.append(f"{name}: the Python reader wrote outside slot B and the ESP")
            shutil.copyfile(self.product.factory, self.python_disk)
        shell = self.shell(bundle, streaming=streaming)
        disk_changed = file_sha256(self.shell_disk) != self.pristine
        env_changed = self.grubenv.read_bytes() != self.product.grubenv
        if not shell.accepted and (env_changed or (disk_changed and not streaming)):
            problems.append(f"{name}: the shell applier refused but changed the disk or boot state")
        if disk_changed and not self.unchanged_outside(self.shell_disk, self.slot_b):
            problems.append(f"{name}: the shell applier wrote outside slot B")
        if disk_changed:
            shutil.copyfile(self.product.factory, self.shell_disk)
        if env_changed:
            self.grubenv.write_bytes(self.product.grubenv)
        if shell.accepted:
            shutil.rmtree(self.state, ignore_errors=True)
        return python, shell, problems


PYTHON_WROTE = "the Python reader refused but changed the disk"


def run_corpus(
    product: Product, root: Path, cases: list[Case], *, streaming: bool = False
) -> list[str]:
    """Run every case; fail on a different verdict or a forbidden change. Returns the known
    findings (see below) for the caller to report once every run is done."""
    readers = Readers(product, root)
    differences: list[str] = []
    problems: list[str] = []
    accepted = 0
    for name, data in cases:
        python, shell, found = readers.judge(name, data, streaming=streaming)
        problems += found
        accepted += python.accepted
        if python.accepted != shell.accepted:
            differences.append(
                f"{name}: Python {'accepts' if python.accepted else 'refuses'} "
                f"({python.detail[:300]}), shell {'accepts' if shell.accepted else 'refuses'} "
                f"({shell.detail[-300:]})"
            )
    assert not differences, f"{len(differences)} of {len(cases)} cases differ:\n" + "\n".join(
        differences
    )
    # The oracle can tell: the corpus holds accepted and refused bundles.
    assert 0 < accepted < len(cases) // 2, accepted
    # Issue 12, point 4: the host installer applied a delta's first operations before it had
    # checked the rest. Its fix is the Python side's (the hpy branch); until it is merged, that
    # one finding on delta cases is reported as an expected failure, every other one fails.
    known = [found for found in problems if found.startswith("delta-") and PYTHON_WROTE in found]
    others = [found for found in problems if found not in known]
    assert not others, "\n".join(others)
    return known


def report_known(known: list[str]) -> None:
    if known:
        pytest.xfail(f"{len(known)} delta cases: " + "; ".join(known[:5]))


@pytest.fixture(scope="module")
def corpus(product: Product) -> list[Case]:
    return build_corpus(product.context)


def test_corpus_is_large_and_seeded(product: Product, corpus: list[Case]) -> None:
    assert len(corpus) >= 300
    again = build_corpus(product.context)
    # Ed25519 signatures are deterministic; ECDSA ones are not, so compare the cases without.
    assert [name for name, _ in again] == [name for name, _ in corpus]
    assert dict(again)["valid-full"] == dict(corpus)["valid-full"]


def test_sample_of_the_corpus_same_verdict(
    product: Product, corpus: list[Case], tmp_path: Path
) -> None:
    """Every 20th case, and the valid bundles, in the fast suite."""
    sample = [
        case for index, case in enumerate(corpus) if index % 20 == 0 or case[0].startswith("valid")
    ]
    known = run_corpus(product, tmp_path / "readers", sample)
    known += run_corpus(product, tmp_path / "from-a-pipe", sample, streaming=True)
    report_known(known)


def test_stream_cases_same_verdict(product: Product, corpus: list[Case], tmp_path: Path) -> None:
    """Every zstd-stream case (manifest version 3), from a file and from a pipe: among them
    the frame-end corner (a skippable frame or a second frame after a frame's end, inside
    its last chunk or in a chunk of its own), where the zstd command alone is lenient."""
    cases = [case for case in corpus if case[0].startswith(("stream-", "valid-stream"))]
    names = {name for name, _ in cases}
    assert {"stream-skippable-after-frame-end", "stream-skippable-as-chunk"} <= names
    report_known(run_corpus(product, tmp_path / "readers", cases))
    report_known(run_corpus(product, tmp_path / "from-a-pipe", cases, streaming=True))


@pytest.mark.slow
def test_whole_corpus_same_verdict(product: Product, corpus: list[Case], tmp_path: Path) -> None:
    report_known(run_corpus(product, tmp_path / "readers", corpus))


def test_delta_version_2_same_verdict(product: Product, corpus: list[Case], tmp_path: Path) -> None:
    """Stream version 2 (windows, bspatch raw and with the x86 filter; squashfs zstd-version,
    zwindow and recompress): every case, from a file and from a pipe, with the valid ones
    applied by both readers. The x86 bspatch is a BSDIFFLZ patch: each way of making one of
    its LZMA2 streams wrong is refused by both, its BSDIFF40 rewrite accepted by both."""
    cases = [case for case in corpus if case[0].startswith("delta2-")]
    assert len(cases) >= 50
    lz_cases = [name for name, _ in cases if name.startswith("delta2-x86-payload-lz-")]
    assert len(lz_cases) == 10
    readers = Readers(product, tmp_path / "valid")
    for name, accepted in (
        ("delta2-valid", True),
        ("delta2-as-version-1", False),
        ("delta2-sq-valid", True),
        ("delta2-sq-as-version-1", False),
        *((name, name.endswith("-as-bsdiff40")) for name in lz_cases),
    ):
        python, shell, found = readers.judge(name, dict(cases)[name])
        assert (python.accepted, shell.accepted, found) == (accepted, accepted, []), (
            python.detail,
            shell.detail,
        )
    known = run_corpus(product, tmp_path / "readers", cases)
    known += run_corpus(product, tmp_path / "from-a-pipe", cases[::3], streaming=True)
    report_known(known)
