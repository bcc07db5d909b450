"""Signing with a key held in a PKCS#11 token (an HSM, a smart card, SoftHSM2).

The key is named by a PKCS#11 URI (RFC 7512), for example
`pkcs11:token=release;object=bundle-2026?pin-source=file:/run/secrets/pin&module-path=/usr/lib/softhsm/libsofthsm2.so`.
Path attributes used: `token` (label), `object` (key label), `id` (key CKA_ID, percent-encoded),
`serial`. Query attributes: `module-path` (the PKCS#11 module), `pin-value` or `pin-source`
(`file:` path). Without them the module and the PIN are the values the caller gives (the
command line takes them from --pkcs11-module, AVOBUILD_PKCS11_MODULE and AVOBUILD_PKCS11_PIN,
so a PIN need not appear on a command line); this module never reads the environment.

The token's public key object of the same label/id gives the key-id and the algorithm; the
private key never leaves the token. Mechanisms: CKM_EDDSA (Ed25519, over the whole manifest),
CKM_ECDSA over a SHA-256/384 digest made here (the raw r||s result is DER-encoded), and
CKM_RSA_PKCS_PSS over a SHA-256 digest with MGF1-SHA-256 and a 32-byte salt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from avobuild.bundle.keys import PublicKey, check_public_key, key_id
from avobuild.bundle.sign import SignatureAlgorithm, raw_ecdsa_to_der, signature_algorithm
from avobuild.errors import KeyError_

URI_SCHEME = "pkcs11:"

# DER of the CKA_EC_PARAMS named-curve OIDs (and the printable-string form some tokens use).
_CURVES: dict[bytes, ec.EllipticCurve | None] = {
    bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(),
    bytes.fromhex("06052b81040022"): ec.SECP384R1(),
    bytes.fromhex("06032b6570"): None,
    b"\x13\x0cedwards25519": None,
}


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str | None
    object: str | None
    id: bytes | None
    serial: str | None
    module_path: Path | None
    pin: str | None


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse the attributes of an RFC 7512 URI that select a signing key."""
    if not uri.startswith(URI_SCHEME):
        raise KeyError_(f"{uri}: not a PKCS#11 URI (expected 'pkcs11:token=…;object=…')")
    path, _, query = uri[len(URI_SCHEME) :].partition("?")
    attributes: dict[str, str] = {}
    for part in filter(None, path.split(";")):
        name, sep, value = part.partition("=")
        if not sep:
            raise KeyError_(f"{uri}: path attribute {part!r} has no '='")
        attributes[name] = value
    queries: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        name, sep, value = part.partition("=")
        if not sep:
            raise KeyError_(f"{uri}: query attribute {part!r} has no '='")
        queries[name] = value
    known = {"token", "object", "id", "serial", "type", "manufacturer", "model"}
    unknown = sorted(set(attributes) - known)
    if unknown:
        raise KeyError_(f"{uri}: unsupported path attribute {unknown[0]!r}")
    if attributes.get("type", "private") != "private":
        raise KeyError_(f"{uri}: type={attributes['type']}: a signing key has type=private")
    pin = unquote(queries["pin-value"]) if "pin-value" in queries else None
    if "pin-source" in queries:
        source = unquote(queries["pin-source"])
        file = source.removeprefix("file:")
        try:
            pin = Path(file).read_text().rstrip("\n")
        except OSError as error:
            raise KeyError_(f"{uri}: pin-source {source}: {error.strerror or error}") from None
    module = queries.get("module-path")
    return Pkcs11Uri(
        token=unquote(attributes["token"]) if "token" in attributes else None,
        object=unquote(attributes["object"]) if "object" in attributes else None,
        id=unquote_to_bytes(attributes["id"]) if "id" in attributes else None,
        serial=unquote(attributes["serial"]) if "serial" in attributes else None,
        module_path=Path(unquote(module)) if module else None,
        pin=pin,
    )


def _public_key_of(public_object: Any, uri: str) -> PublicKey:
    import pkcs11

    attribute = pkcs11.Attribute
    key_type = public_object[attribute.KEY_TYPE]
    if key_type == pkcs11.KeyType.RSA:
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(public_object[attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(public_object[attribute.MODULUS], "big"),
        )
        return check_public_key(numbers.public_key(), uri)
    params = bytes(public_object[attribute.EC_PARAMS])
    point_der = bytes(public_object[attribute.EC_POINT])
    # CKA_EC_POINT is a DER OCTET STRING holding the encoded point.
    if len(point_der) < 2 or point_der[0] != 0x04:
        raise KeyError_(f"{uri}: the token's public key has an unreadable CKA_EC_POINT")
    header = 2 if point_der[1] < 0x80 else 2 + (point_der[1] & 0x7F)
    point = point_der[header:]
    if params not in _CURVES:
        raise KeyError_(f"{uri}: the token's key uses a curve avobuild does not support")
    curve = _CURVES[params]
    if curve is None:
        return ed25519.Ed25519PublicKey.from_public_bytes(point)
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)


class Pkcs11Signer:
    """A Signer whose private key stays in a PKCS#11 token. Close it (or use `with`)."""

    def __init__(self, uri: str, module: Path | None = None, pin: str | None = None) -> None:
        import pkcs11
        from pkcs11 import exceptions as pkcs11_errors

        parsed = parse_pkcs11_uri(uri)
        shown = uri.split("?", 1)[0]
        module_path = parsed.module_path or module
        if module_path is None:
            raise KeyError_(
                f"{shown}: no PKCS#11 module: add module-path=… to the URI, pass "
                "--pkcs11-module or set AVOBUILD_PKCS11_MODULE"
            )
        if not module_path.is_file():
            raise KeyError_(f"{shown}: PKCS#11 module {module_path} not found")
        user_pin = parsed.pin or pin
        try:
            library = pkcs11.lib(str(module_path))
            token = library.get_token(token_label=parsed.token, token_serial=_serial(parsed))
            try:
                self._session = token.open(user_pin=user_pin)
            except pkcs11_errors.UserAlreadyLoggedIn:
                # Login is per application and token: a second key of the same token
                # shares the first one's login.
                self._session = token.open()
        except pkcs11_errors.PKCS11Error as error:
            raise KeyError_(
                f"{shown}: cannot open the token ({type(error).__name__}: {error}); check "
                "the token label, the module and the PIN"
            ) from None
        try:
            private: Any = self._session.get_key(
                pkcs11.ObjectClass.PRIVATE_KEY, label=parsed.object, id=parsed.id
            )
            self._private = private
            public_object = self._session.get_key(
                pkcs11.ObjectClass.PUBLIC_KEY, label=parsed.object, id=parsed.id
            )
            self._public_key = _public_key_of(public_object, shown)
        except pkcs11_errors.NoSuchKey:
            self._session.close()
            raise KeyError_(f"{shown}: no private and public key pair with this label/id") from None
        except pkcs11_errors.MultipleObjectsReturned:
            self._session.close()
            raise KeyError_(f"{shown}: several keys match; name one with object= or id=") from None
        except pkcs11_errors.PKCS11Error as error:
            self._session.close()
            raise KeyError_(f"{shown}: {type(error).__name__}: {error}") from None
        self._algorithm = signature_algorithm(self._public_key)
        self._key_id = key_id(self._public_key)
        self.uri = shown

    @property
    def algorithm(self) -> SignatureAlgorithm:
        return self._algorithm

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def public_key(self) -> PublicKey:
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        import pkcs11
        from pkcs11 import exceptions as pkcs11_errors

        mechanism = pkcs11.Mechanism
        try:
            if self._algorithm is SignatureAlgorithm.ED25519:
                return bytes(self._private.sign(data, mechanism=mechanism.EDDSA))
            if self._algorithm is SignatureAlgorithm.RSA_PSS_SHA256:
                return bytes(
                    self._private.sign(
                        hashlib.sha256(data).digest(),
                        mechanism=mechanism.RSA_PKCS_PSS,
                        mechanism_param=(mechanism.SHA256, pkcs11.MGF.SHA256, 32),
                    )
                )
            digest = (
                hashlib.sha384(data)
                if self._algorithm is SignatureAlgorithm.ECDSA_P384_SHA384
                else hashlib.sha256(data)
            )
            raw = bytes(self._private.sign(digest.digest(), mechanism=mechanism.ECDSA))
        except pkcs11_errors.PKCS11Error as error:
            raise KeyError_(
                f"{self.uri}: the token refused to sign ({type(error).__name__}: {error})"
            ) from None
        return raw_ecdsa_to_der(self._algorithm, raw)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _serial(parsed: Pkcs11Uri) -> bytes | None:
    return parsed.serial.encode() if parsed.serial is not None else None
