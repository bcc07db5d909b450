"""What the repository, server and fleet tests share (no tests of its own).

* `make_pki`: a server CA, a device CA and certificates made by `openssl req -x509 -CA`, as
  a fleet's PKI would make them (device id in the CN and in a `urn:avobuild:device:` URI);
* `release_bundles`: real bundles of the small test product (conftest.write_product), built
  once per test session with `avobuild bundle create`;
* `running_server`: `avobuild serve` as a subprocess on a free loopback port, stopped by its
  process id;
* `https`: a client with a device certificate (Python's ssl, so tests can send anything);
* `postgres_cluster`: a throwaway PostgreSQL cluster (Debian's `postgresql` package), run as
  the `postgres` user in a directory made under /tmp (pytest's tmp_path is not reachable by
  that user), stopped and removed afterwards.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, avobuild_cli, write_product

AVOBUILD = str(REPO / ".venv" / "bin" / "avobuild")
COMPATIBLE = "testprod-x86_64"
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def openssl(*args: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, cwd=cwd, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(map(str, args))}: {result.stderr}")
    return result.stdout


@dataclass(frozen=True)
class Pki:
    root: Path
    server_ca: Path
    server_certificate: Path
    server_key: Path
    device_ca: Path

    def device(self, device_id: str) -> tuple[Path, Path]:
        return self.root / f"{device_id}.crt", self.root / f"{device_id}.key"


def _ca(root: Path, name: str, subject: str) -> None:
    openssl(
        "req",
        "-x509",
        "-new",
        *EC,
        "-keyout",
        root / f"{name}.key",
        "-out",
        root / f"{name}.crt",
        "-days",
        "3650",
        "-subj",
        f"/CN={subject}",
        "-addext",
        "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )


def leaf(
    root: Path,
    name: str,
    ca: str,
    subject: str,
    usage: str,
    alt_names: str | None,
) -> tuple[Path, Path]:
    """A certificate `name`.crt/.key issued by the CA `ca` (a file stem in `root`)."""
    extensions = [
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-addext",
        "keyUsage=critical,digitalSignature",
        "-addext",
        f"extendedKeyUsage={usage}",
    ]
    if alt_names:
        extensions += ["-addext", f"subjectAltName={alt_names}"]
    openssl(
        "req",
        "-x509",
        "-new",
        *EC,
        "-keyout",
        root / f"{name}.key",
        "-out",
        root / f"{name}.crt",
        "-days",
        "825",
        "-subj",
        subject,
        "-CA",
        root / f"{ca}.crt",
        "-CAkey",
        root / f"{ca}.key",
        *extensions,
    )
    return root / f"{name}.crt", root / f"{name}.key"


def add_device(pki: Pki, device_id: str) -> tuple[Path, Path]:
    return leaf(
        pki.root,
        device_id,
        "device-ca",
        f"/CN={device_id}",
        "clientAuth",
        f"URI:urn:avobuild:device:{device_id}",
    )


def make_pki(root: Path, devices: list[str]) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    _ca(root, "server-ca", "avobuild test server CA")
    _ca(root, "device-ca", "avobuild test device CA")
    leaf(root, "server", "server-ca", "/CN=localhost", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    pki = Pki(
        root,
        root / "server-ca.crt",
        root / "server.crt",
        root / "server.key",
        root / "device-ca.crt",
    )
    for device in devices:
        add_device(pki, device)
    return pki


# --- bundles -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Releases:
    bundles: dict[str, Path]  # version -> full bundle
    private_key: Path
    public_key: Path


def release_bundles(factory: pytest.TempPathFactory) -> Releases:
    """Full bundles 1.0.0, 1.1.0 and 1.2.0 of the test product, each a small change of the
    previous one, built once per session (the same directory for every module)."""
    root = factory.getbasetemp() / "fleet-releases"
    done = root / "done"
    product = write_product(root / "product")
    bundles = {}
    if not done.exists():
        for number, version in enumerate(("1.0.0", "1.1.0", "1.2.0")):
            if number:
                (product.rootfs / f"release-{version}").write_text(f"release {version}\n" * 50)
            recipe = write_product(root / "product", version=version).recipe
            avobuild_cli("bundle", "create", recipe, "-o", root / f"{version}.avb")
        done.write_text("")
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        bundles[version] = root / f"{version}.avb"
    return Releases(bundles, product.private_key, product.public_key)


def init_repository(root: Path, releases: Releases, index_key: Path, *extra: str | Path) -> None:
    avobuild_cli(
        "repo",
        "init",
        root,
        "--name",
        "acme",
        "--bundle-keyring",
        releases.public_key,
        "--key",
        index_key,
        "--delta-key",
        releases.private_key,
        *extra,
    )


def index_key(directory: Path, name: str = "index", key_type: str = "ed25519") -> Path:
    avobuild_cli("keys", "generate", "-o", directory, "--name", name, "--type", key_type)
    return directory / f"{name}.key.pem"


# --- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Server:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    pki: Pki

    def client(self, device: str) -> Https:
        certificate, key = self.pki.device(device)
        return Https(self.port, self.pki.server_ca, certificate, key)


@contextmanager
def running_server(repository: Path, pki: Pki, log: Path, *extra: str) -> Iterator[Server]:
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                AVOBUILD,
                "serve",
                str(repository),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--certificate",
                str(pki.server_certificate),
                "--key",
                str(pki.server_key),
                "--client-ca",
                str(pki.device_ca),
                *extra,
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"avobuild serve exited {process.returncode}:\n" + log.read_text()
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        "avobuild serve did not listen:\n" + log.read_text()
                    ) from None
                time.sleep(0.1)
        yield Server(port, process, log, pki)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        import json

        return json.loads(self.body)


class Https:
    """One device's HTTPS client (a fresh connection per request)."""

    def __init__(self, port: int, server_ca: Path, certificate: Path, key: Path) -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=str(server_ca))
        self.context.load_cert_chain(certificate, key)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        connection = http.client.HTTPSConnection(
            "localhost", self.port, context=self.context, timeout=30
        )
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Answer(
                response.status,
                {name.lower(): value for name, value in response.getheaders()},
                response.read(),
            )
        finally:
            connection.close()

    def get(self, path: str, **headers: str) -> Answer:
        return self.request(
            "GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()}
        )

    def post_json(self, path: str, body: bytes) -> Answer:
        return self.request("POST", path, body, {"Content-Type": "application/json"})


# --- PostgreSQL ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    url: str
    port: int
    bin: Path

    def psql(self, query: str, database: str = "fleet") -> str:
        return subprocess.run(
            [
                str(self.bin / "psql"),
                "-X",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "avobuild",
                "-d",
                "fleet",
                "-c",
                query,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def _postgres_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


@contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    """A private PostgreSQL cluster on a free port (needs root to run as `postgres`)."""
    binaries = _postgres_bin()
    if binaries is None:
        pytest.fail("PostgreSQL is not installed (scripts/host-packages.d/fleet.txt: postgresql)")
    if os.geteuid() != 0:
        pytest.skip("starting a PostgreSQL cluster needs root (to run it as the postgres user)")
    directory = Path(tempfile.mkdtemp(prefix="avobuild-pg-", dir="/tmp"))
    shutil.chown(directory, "postgres", "postgres")
    directory.chmod(0o700)
    port = free_port()
    data = directory / "data"

    def as_postgres(*argv: str | Path) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, argv)],
            check=True,
            capture_output=True,
            cwd="/tmp",
        )

    started = False
    try:
        as_postgres(
            binaries / "initdb",
            "-D",
            data,
            "-U",
            "avobuild",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        )
        as_postgres(
            binaries / "pg_ctl",
            "-D",
            data,
            "-l",
            directory / "server.log",
            "-w",
            "-t",
            "60",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off",
            "start",
        )
        started = True
        as_postgres(
            binaries / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "avobuild", "fleet"
        )
        yield Postgres(f"postgresql://avobuild@127.0.0.1:{port}/fleet", port, binaries)
    finally:
        if started:
            as_postgres(binaries / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(directory, ignore_errors=True)


def wait_for_check(
    server: Server,
    device: str,
    query: str,
    until: Callable[[dict[str, object]], bool],
    what: str,
    timeout: float = 60.0,
) -> dict[str, object]:
    """Ask /updates/check/<device>?<query> until `until` holds (a halt or a resume travels
    through the database); a 429 only means "ask later" here."""
    deadline = time.monotonic() + timeout
    while True:
        answer = server.client(device).get(f"/updates/check/{device}?{query}")
        if answer.status == 200:
            result = answer.json()
            assert isinstance(result, dict)
            if until(result):
                return result
        else:
            assert answer.status == 429, answer.body
        assert time.monotonic() < deadline, f"{what}: not seen within {timeout:.0f} s"
        time.sleep(1.0 if answer.status == 200 else min(5.0, float(answer.headers["retry-after"])))
