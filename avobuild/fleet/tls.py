"""Mutual TLS: the server's context and the device identity in a client certificate.

The server trusts only the device CA it is given (never the system's CA store, which
`ssl.create_default_context` would add for client authentication), requires a certificate
(`CERT_REQUIRED`: a client without one fails the handshake and reaches nothing), and OpenSSL
checks the client certificate's chain, validity and purpose (extended key usage clientAuth).
The device id is the certificate subject's one common name; when the certificate also
carries `urn:avobuild:device:` URI names (the profile docs/fleet.md recommends), each must
name that same id, so one certificate can never speak for two devices.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from avobuild.errors import KeyError_
from avobuild.fleet.settings import DEVICE_ID, DEVICE_ID_GRAMMAR

DEVICE_URN = "urn:avobuild:device:"


class IdentityRefused(ValueError):
    """The verified certificate does not name exactly one valid device id."""


def server_context(certificate: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as error:
        raise KeyError_(
            f"{certificate}, {key}: cannot load the server certificate and key: {error}"
        ) from None
    try:
        context.load_verify_locations(cafile=client_ca)
    except (OSError, ssl.SSLError) as error:
        raise KeyError_(f"{client_ca}: cannot load the device CA certificates: {error}") from None
    return context


def device_of(peercert: dict[str, Any] | None) -> str:
    """The device id of a verified peer certificate (`SSLSocket.getpeercert()` form)."""
    if not peercert:
        raise IdentityRefused("a client certificate is required")
    names = [
        value
        for relative_name in peercert.get("subject", ())
        for key, value in relative_name
        if key == "commonName"
    ]
    if len(names) != 1:
        raise IdentityRefused(
            f"the certificate subject has {len(names)} common names; expected one, the device id"
        )
    device = str(names[0])
    if not DEVICE_ID.fullmatch(device):
        raise IdentityRefused(
            f"the certificate's common name {device[:80]!r} is not a device id "
            f"({DEVICE_ID_GRAMMAR})"
        )
    urns = [
        value
        for kind, value in peercert.get("subjectAltName", ())
        if kind == "URI" and value.startswith(DEVICE_URN)
    ]
    if any(urn != DEVICE_URN + device for urn in urns):
        raise IdentityRefused(
            f"the certificate's URI names {urns} do not all name device {device!r}"
        )
    return device
