"""Load benchmark of `avobuild serve` against a plain static file server (docs/performance.md).

    .venv/bin/python bench/fleet/run.py [--work build/bench-fleet] [--devices 10000]
                                        [--concurrency 64] [--time-limit 300]

Builds a small repository (two releases, 1.1.0 rolled out to 50 %), a PKI (CAs and the
server certificate with openssl, one client certificate per simulated device), then runs
each scenario on a fresh server process with the same simulated devices (loadgen.py: one TLS
connection per device with its own certificate, two requests on it):

  serve-sqlite     avobuild serve, SQLite:      check + telemetry (2 events)
  serve-postgres   avobuild serve, PostgreSQL:  check + telemetry (a throwaway cluster)
  serve-static     avobuild serve:              GET /index.signed twice
  nginx-static     nginx, TLS with client certificates required: GET /index.signed twice

One server process each (nginx: one worker), on the same two cores as the load generator.
Peak RSS is the server processes' VmHWM. Writes WORK/results.json and WORK/results.md.
PostgreSQL needs root (the cluster runs as the postgres user); without root it is skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
AVOBUILD = str(BIN / "avobuild")
COMPATIBLE = "bench-board"
SCENARIOS = ("serve-sqlite", "serve-postgres", "serve-static", "nginx-static")


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    arguments = [str(a) for a in argv]
    return subprocess.run(arguments, check=True, capture_output=True, text=True)  # noqa: S603


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise SystemExit(f"server exited {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"server did not listen:\n{log.read_text()}") from None
            time.sleep(0.1)


def peak_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes used so far (/proc/PID/stat fields 14 and 15)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


# --- setup ---------------------------------------------------------------------------------


def make_pki(work: Path, devices: int) -> Path:
    pki = work / "pki"
    marker = pki / f"devices-{devices}"
    if marker.exists():
        return pki
    shutil.rmtree(pki, ignore_errors=True)
    (pki / "devices").mkdir(parents=True)
    ec_args = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for name in ("server-ca", "device-ca"):
        run(
            "openssl",
            "req",
            "-x509",
            "-new",
            *ec_args,
            "-keyout",
            pki / f"{name}.key",
            "-out",
            pki / f"{name}.crt",
            "-days",
            "3650",
            "-subj",
            f"/CN=bench {name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
    run(
        "openssl",
        "req",
        "-x509",
        "-new",
        *ec_args,
        "-keyout",
        pki / "server.key",
        "-out",
        pki / "server.crt",
        "-days",
        "825",
        "-subj",
        "/CN=localhost",
        "-CA",
        pki / "server-ca.crt",
        "-CAkey",
        pki / "server-ca.key",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-addext",
        "extendedKeyUsage=serverAuth",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
    )
    # Thousands of device certificates: made in-process (openssl would take minutes).
    ca_key = serialization.load_pem_private_key((pki / "device-ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki / "device-ca.crt").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    for number in range(devices):
        device = f"bench-{number:05d}"
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"urn:avobuild:device:{device}")]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        (pki / "devices" / f"{device}.pem").write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    marker.write_text("")
    return pki


def make_repository(work: Path) -> Path:
    repository = work / "repo"
    if (repository / "repository.toml").exists():
        return repository
    keys = work / "keys"
    for name in ("release", "index"):
        if not (keys / f"{name}.key.pem").exists():
            run(AVOBUILD, "keys", "generate", "-o", keys, "--name", name)
    rng = random.Random(4)
    bundles = []
    for version in ("1.0.0", "1.1.0"):
        image = work / f"rootfs-{version}.img"
        image.write_bytes(rng.randbytes(1 << 20))
        bundle = work / f"{version}.avb"
        run(
            AVOBUILD,
            "bundle",
            "create",
            "--image",
            f"rootfs={image}",
            "--name",
            "bench",
            "--version",
            version,
            "--compatible",
            COMPATIBLE,
            "--key",
            keys / "release.key.pem",
            "-o",
            bundle,
        )
        bundles.append(bundle)
    run(
        AVOBUILD,
        "repo",
        "init",
        repository,
        "--name",
        "bench",
        "--bundle-keyring",
        keys / "release.pub.pem",
        "--key",
        keys / "index.key.pem",
    )
    run(AVOBUILD, "repo", "add", repository, bundles[0], "--channel", "stable")
    run(AVOBUILD, "repo", "add", repository, bundles[1], "--channel", "stable", "--percent", "50")
    return repository


# --- servers -------------------------------------------------------------------------------


@contextmanager
def avobuild_serve(
    repository: Path, pki: Path, work: Path, database: str | None
) -> Iterator[tuple[int, list[int]]]:
    port = free_port()
    log = work / "serve.log"
    argv = [
        AVOBUILD,
        "serve",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--certificate",
        str(pki / "server.crt"),
        "--key",
        str(pki / "server.key"),
        "--client-ca",
        str(pki / "device-ca.crt"),
    ]
    if database is not None:
        argv += ["--database", database]
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        wait_for(port, process, log)
        yield port, [process.pid]
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def nginx(repository: Path, pki: Path, work: Path) -> Iterator[tuple[int, list[int]]]:
    port = free_port()
    directory = work / "nginx"
    directory.mkdir(exist_ok=True)
    config = directory / "nginx.conf"
    config.write_text(f"""\
daemon off;
master_process on;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki}/server.crt;
        ssl_certificate_key {pki}/server.key;
        ssl_client_certificate {pki}/device-ca.crt;
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        root {repository}/public;
    }}
}}
""")
    log = directory / "stdout.log"
    with log.open("wb") as output:
        process = subprocess.Popen(  # noqa: S603 - argv list
            ["nginx", "-c", str(config)], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_for(port, process, log)
        yield port, [process.pid, *children(process.pid)]
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def postgres() -> Iterator[str | None]:
    if os.geteuid() != 0:
        yield None
        return
    sys.path.insert(0, str(REPO / "tests"))
    from test_fleet_support import postgres_cluster  # type: ignore[import-not-found]

    with postgres_cluster() as cluster:
        yield cluster.url


def measure(
    name: str, port: int, pids: list[int], pki: Path, args: argparse.Namespace, pattern: str
) -> dict[str, object]:
    print(f"{name}: {args.devices} devices, {args.concurrency} at a time …", flush=True)
    cpu_before = cpu_seconds(pids)
    result = run(
        BIN / "python",
        REPO / "bench" / "fleet" / "loadgen.py",
        "--port",
        str(port),
        "--server-ca",
        pki / "server-ca.crt",
        "--devices-dir",
        pki / "devices",
        "--devices",
        str(args.devices),
        "--concurrency",
        str(args.concurrency),
        "--time-limit",
        str(args.time_limit),
        "--pattern",
        pattern,
        "--compatible",
        COMPATIBLE,
    )
    measured: dict[str, object] = json.loads(result.stdout)
    measured["scenario"] = name
    measured["peak_rss_mib"] = round(peak_rss(pids) / (1 << 20), 1)
    cpu = cpu_seconds(pids) - cpu_before
    requests = measured["requests"]
    assert isinstance(requests, int)
    measured["server_cpu_s"] = round(cpu, 2)
    # Requests one fully busy core of this machine would serve: the server's own cost,
    # independent of the load generator sharing the cores.
    measured["requests_per_cpu_s"] = round(requests / cpu, 1) if cpu else None
    print(json.dumps(measured), flush=True)
    return measured


def markdown(results: list[dict[str, object]]) -> str:
    lines = [
        "| scenario | devices | requests | req/s | req per server CPU-s | 1st p50 / p99 (ms) "
        "| 2nd p50 / p99 (ms) | handshake p50 (ms) | server peak RSS (MiB) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        latency = r["latency_ms"]
        assert isinstance(latency, dict)
        first, second, handshake = latency["first"], latency["second"], latency["handshake"]
        lines.append(
            f"| {r['scenario']} | {r['devices']} | {r['requests']} | {r['requests_per_s']} "
            f"| {r['requests_per_cpu_s']} "
            f"| {first['p50']} / {first['p99']} | {second['p50']} / {second['p99']} "
            f"| {handshake['p50']} | {r['peak_rss_mib']} | {r['errors'] or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench-fleet")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated subset of: " + ", ".join(SCENARIOS),
    )
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1767225600")
    pki = make_pki(work, args.devices)
    repository = make_repository(work)
    results = []
    for scenario in args.scenarios.split(","):
        if scenario not in SCENARIOS:
            raise SystemExit(f"--scenarios: unknown scenario {scenario!r}")
        if scenario == "nginx-static":
            with nginx(repository, pki, work) as (port, pids):
                results.append(measure(scenario, port, pids, pki, args, "static"))
            continue
        if scenario == "serve-postgres":
            with postgres() as url:
                if url is None:
                    print("serve-postgres: skipped (needs root)")
                    continue
                with avobuild_serve(repository, pki, work, url) as (port, pids):
                    results.append(measure(scenario, port, pids, pki, args, "serve"))
            continue
        database = str(work / f"telemetry-{time.time_ns()}.sqlite")
        pattern = "static" if scenario == "serve-static" else "serve"
        with avobuild_serve(repository, pki, work, database) as (port, pids):
            results.append(measure(scenario, port, pids, pki, args, pattern))
    load = os.getloadavg()
    summary = {
        "results": results,
        "cpus": os.cpu_count(),
        "load_average_after": load,
        "devices": args.devices,
        "concurrency": args.concurrency,
    }
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    (work / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
