"""Verify time of the on-target applier: a normal bundle against the same bundle with an
adversarial signature block (12,787 short untrusted `signature` lines, 1 MiB), on the
simulated device of tests/test_applier_device.py (a 24 MiB ext4 image, 512 KiB chunks).

Usage (from the repository root; `make -f bench/Makefile bench-applier` runs exactly this):

    .venv/bin/python bench/applier/verify.py [--work build/bench-applier] [--runs 5]

Prints the median wall time of `avocado-update verify` for both bundles and the verdicts.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from conftest import avobuild_cli, write_product  # noqa: E402

from avobuild.applier.render import SCRIPT_PATH, render_applier  # noqa: E402
from avobuild.boot.state import BOOT_STATE_PATH  # noqa: E402
from avobuild.disk.plan import plan_layout  # noqa: E402
from avobuild.fs import read_vfat_file  # noqa: E402
from avobuild.image.factory import build_factory_image  # noqa: E402
from avobuild.model.layout import Role  # noqa: E402
from avobuild.model.recipe import load_recipe  # noqa: E402


def adversarial(bundle: bytes, lines: int = 12787) -> bytes:
    """The bundle with `lines` untrusted signature lines added, the block cut to 1 MiB."""
    manifest_size, block_size = int(bundle[12:22]), int(bundle[23:33])
    manifest = bundle[34 : 34 + manifest_size]
    block = bundle[34 + manifest_size : 34 + manifest_size + block_size]
    rng = random.Random(1)
    block += b"".join(
        b"signature e %s AAAA\n" % rng.randbytes(32).hex().encode() for _ in range(lines)
    )
    while len(block) > 1 << 20:
        block = block[: block.rindex(b"\n", 0, len(block) - 1) + 1]
    payload = bundle[34 + manifest_size + block_size :]
    return b"AVOBUNDLE 1 %010d %010d\n" % (manifest_size, len(block)) + manifest + block + payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench-applier")
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    work = options.work
    shutil.rmtree(work, ignore_errors=True)
    product = write_product(work / "product")
    recipe = load_recipe(product.recipe)
    factory = build_factory_image(recipe, work / "out", work / "build").path
    bundle = work / "update.avb"
    (product.rootfs / "etc" / "motd").write_text("version 2\n")
    v2 = write_product(work / "product", version="2.0.0")
    avobuild_cli("bundle", "create", v2.recipe, "-o", bundle, "--chunk-size", "512K")
    hostile = work / "hostile.avb"
    hostile.write_bytes(adversarial(bundle.read_bytes()))
    render_applier(recipe, work / "rendered")
    boot = plan_layout(recipe.layout).by_role(Role.BOOT)
    assert boot is not None
    grubenv = work / "grubenv"
    grubenv.write_bytes(read_vfat_file(factory, boot.offset, BOOT_STATE_PATH))
    (work / "proc").mkdir()
    (work / "proc" / "cmdline").write_text("ro avo.slot=A\n")
    env = {
        "PATH": "/bin:/usr/bin",
        "AVO_DISK": str(factory),
        "AVO_GRUBENV": str(grubenv),
        "AVO_STATE_DIR": str(work / "state"),
        "AVO_CONF_DIR": str(work / "rendered" / "etc" / "avocado"),
        "AVO_PROC": str(work / "proc"),
        "AVO_TMPDIR": str(work),
    }
    script = work / "rendered" / SCRIPT_PATH
    for name, path in (("normal", bundle), ("adversarial", hostile)):
        times = []
        for _ in range(options.runs):
            start = time.monotonic()
            result = subprocess.run(  # noqa: S603 (fixed argv)
                ["busybox", "sh", str(script), "verify", "--bundle", str(path)],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            times.append(time.monotonic() - start)
        verdict = "accepted" if result.returncode == 0 else "refused: " + result.stderr[-80:]
        median = statistics.median(times)
        print(f"{name:12} median {median:6.2f} s over {options.runs} runs: {verdict.strip()}")


if __name__ == "__main__":
    main()
