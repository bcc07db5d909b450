"""Signature-block benchmark: what a hostile block costs the Python reader before authentication.

Usage (from the repository root):

    .venv/bin/python bench/signatures/run.py [--work build/bench-signatures]

Prints, for each block, its size, its line count, the best of three wall times to verify it
against a keyring, and the verdict: a normal block, 1 MiB of 12,787 short `signature` lines
(issue 12: 2.5 s before the limits of docs/bundle-format.md 4.2), 1 MiB of unknown lines, and
certificate blocks against a trust anchor (one honest chain; 32 signers whose certificates
share a subject, name the anchor as issuer, or form a chain of bad links).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from avobuild.bundle.keys import key_id, load_keyring, load_private_key  # noqa: E402
from avobuild.bundle.reader import BundleReader  # noqa: E402
from avobuild.bundle.sign import CertificateEntry, KeySigner, sign_manifest_with  # noqa: E402
from avobuild.bundle.verify import verify_all_signatures  # noqa: E402
from avobuild.bundle.writer import ImageSource, write_bundle  # noqa: E402
from avobuild.errors import BundleError  # noqa: E402

KEY = REPO / "keys-example" / "insecure-example.key.pem"
MIB = 1 << 20


def best_of_three(check: Callable[[], None]) -> tuple[float, str]:
    best, verdict = float("inf"), ""
    for _ in range(3):
        start = time.perf_counter()
        try:
            check()
            verdict = "accepted"
        except BundleError as error:
            verdict = "refused: " + str(error)[:70]
        best = min(best, time.perf_counter() - start)
    return best, verdict


def line_blocks(work: Path) -> None:
    image = work / "image"
    image.write_bytes(bytes(100_000))
    write_bundle(work / "normal.avb", [ImageSource("rootfs", image)], name="d", version="1",
                 compatible="c", build_date=0, private_key=load_private_key(KEY),
                 chunk_size=64 << 10)  # fmt: skip
    data = (work / "normal.avb").read_bytes()
    manifest_size, block_size = int(data[12:22]), int(data[23:33])
    manifest = data[34 : 34 + manifest_size]
    block = data[34 + manifest_size : 34 + manifest_size + block_size]
    payload = data[34 + manifest_size + block_size :]
    ring = load_keyring(KEY.with_name("insecure-example.pub.pem"))
    lines = block.decode().splitlines()
    signatures = [f"signature a {hashlib.sha256(b'%d' % n).hexdigest()} AAAA" for n in range(12787)]
    unknown = [f"x {'a' * 78}" for _ in range(12787)]
    for label, extra in (("normal block", []), ("12,787 short signature lines", signatures),
                         ("12,787 unknown lines", unknown)):  # fmt: skip
        text = ("\n".join(lines + extra) + "\n").encode()
        text = text[: text[:MIB].rfind(b"\n") + 1]
        bundle = b"AVOBUNDLE 1 %010d %010d\n" % (manifest_size, len(text))
        bundle += manifest + text + payload

        def check(bundle: bytes = bundle) -> None:
            with BundleReader.from_stream(io.BytesIO(bundle), "x") as reader:
                reader.verify_signature(ring)

        seconds, verdict = best_of_three(check)
        print(f"{label:56} {len(text):8} B {text.count(10):6} lines {seconds * 1e3:8.2f} ms  "
              f"{verdict}")  # fmt: skip


def certificate_blocks(work: Path) -> None:
    curve = ec.SECP384R1()
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    Key = ec.EllipticCurvePrivateKey

    def certificate(
        subject: str, issuer: str, key: Key, signer: Key, serial: int
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
            .public_key(key.public_key()).serial_number(serial).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=999))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer, hashes.SHA384())
        )  # fmt: skip

    def entry(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> CertificateEntry:
        return CertificateEntry(
            key_id(key.public_key()), cert.public_bytes(serialization.Encoding.DER)
        )

    root_key = ec.generate_private_key(curve)
    (work / "root.pem").write_bytes(
        certificate("Root", "Root", root_key, root_key, 1).public_bytes(serialization.Encoding.PEM)
    )
    ring = load_keyring(work / "root.pem")
    keys = [ec.generate_private_key(curve) for _ in range(32)]
    junk, inter_key = ec.generate_private_key(curve), ec.generate_private_key(curve)
    inter = certificate("Inter", "Root", inter_key, root_key, 2)
    signers = [KeySigner(key) for key in keys]
    data = b"manifest"
    blocks = {
        "one signer, leaf and intermediate (honest)": sign_manifest_with(
            data, signers[:1],
            [entry(keys[0], certificate("leaf", "Inter", keys[0], inter_key, 3)),
             entry(inter_key, inter)]),
        "32 signers, each a leaf under one intermediate (honest)": sign_manifest_with(
            data, signers,
            [entry(k, certificate(f"leaf{n}", "Inter", k, inter_key, n + 200))
             for n, k in enumerate(keys[:31])] + [entry(inter_key, inter)]),
        "32 signers, certificates sharing a subject": sign_manifest_with(
            data, signers, [entry(k, certificate("X", "X", k, junk, n + 10))
                            for n, k in enumerate(keys)]),
        "32 signers, certificates 'issued' by the anchor": sign_manifest_with(
            data, signers, [entry(k, certificate(f"L{n}", "Root", k, junk, n + 50))
                            for n, k in enumerate(keys)]),
        "32 signers, a chain of 32 bad links": sign_manifest_with(
            data, signers, [entry(k, certificate(f"C{n}", f"C{n + 1}", k, junk, n + 90))
                            for n, k in enumerate(keys)]),
    }  # fmt: skip
    moment = int(start.timestamp()) + 86400
    for label, block in blocks.items():
        seconds, verdict = best_of_three(
            lambda block=block: verify_all_signatures(data, block, ring, now=moment)  # type: ignore[misc]
        )
        print(f"{label:56} {seconds * 1e3:8.2f} ms  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench-signatures")
    work = parser.parse_args().work
    work.mkdir(parents=True, exist_ok=True)
    line_blocks(work)
    certificate_blocks(work)


if __name__ == "__main__":
    main()
