"""Optional payload encryption: AES-256-GCM per chunk, the key wrapped for recipients.

docs/signing.md, "Encryption". A bundle's content key K (32 bytes: random, or from a key
file) encrypts every chunk's stored bytes (the zstd frame) separately:

    stored = nonce (12) || AES-256-GCM(K, nonce, frame, aad = "<image> <index>") || tag (16)
    nonce  = HMAC-SHA256(K, "avobuild nonce <image> <index> " || sha256(frame))[:12]

The nonce is derived from the content, so the same inputs give the same bundle, and two
different frames never share a nonce under one key. The manifest (signed) carries only a
commitment to K, sha256("avobuild aes-256-gcm key\\n" || K), so a reader knows the key it
unwrapped is the signer's before using it; the chunk hashes in the manifest cover the
ciphertext, so every chunk is authenticated before it is decrypted. Because of that a
device may decrypt with plain AES-256-CTR (IV = nonce || 00000002), which
`openssl enc -d -aes-256-ctr` does; `openssl enc` has no GCM mode.

Recipients are `recipient <key-id> <method> <base64>` lines in the signature block (they add
a way to get K, never trust; a wrong one fails the key commitment):

* `rsa-oaep-sha256`: K encrypted with RSA-OAEP, SHA-256 and MGF1-SHA-256;
* `ecdh-p256-hkdf-sha256` / `ecdh-p384-hkdf-sha256`: an ephemeral EC key E; the value is
  E's uncompressed point || AES-256-CTR(W, IV 0, K) where W = HKDF-SHA256(ECDH(E,
  recipient), no salt, info "avobuild key wrap", 32 bytes). W is used once, so a zero IV is
  sound, and `openssl pkeyutl -derive`, `openssl kdf HKDF` and `openssl enc -aes-256-ctr`
  unwrap it on a device.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from avobuild.bundle.keys import PrivateKey, PublicKey, key_id
from avobuild.errors import BundleError, KeyError_

# What opens an encrypted payload: a recipient's private key, or the 32-byte content key.
DecryptionKey = PrivateKey | bytes

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
ALGORITHM = "aes-256-gcm"
WRAP_INFO = b"avobuild key wrap"
_KEY_ID = re.compile(r"[0-9a-f]{64}", re.ASCII)
_HEX_KEY = re.compile(rb"[ \t\r\n]*[0-9a-fA-F]{64}[ \t\r\n]*")
_METHODS = {
    "rsa-oaep-sha256": None,
    "ecdh-p256-hkdf-sha256": ec.SECP256R1(),
    "ecdh-p384-hkdf-sha256": ec.SECP384R1(),
}


def key_commitment(key: bytes) -> str:
    return hashlib.sha256(b"avobuild aes-256-gcm key\n" + key).hexdigest()


def load_content_key(path: Path) -> bytes:
    """A key file: exactly 32 raw bytes, or 64 hex digits (either case) with nothing but
    ASCII whitespace around them (`openssl rand -hex 32` writes one LF after them)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KeyError_(f"{path}: cannot read encryption key: {error.strerror or error}") from None
    if len(data) == KEY_SIZE:
        return data
    if _HEX_KEY.fullmatch(data):
        return bytes.fromhex(data.strip().decode("ascii"))
    raise KeyError_(
        f"{path}: an encryption key file holds 32 bytes, raw or as 64 hex digits "
        "(e.g. 'openssl rand -hex 32')"
    )


def _aad(image: str, index: int) -> bytes:
    return f"{image} {index}".encode("ascii")


def encrypt_chunk(key: bytes, image: str, index: int, frame: bytes) -> bytes:
    seed = f"avobuild nonce {image} {index} ".encode("ascii") + hashlib.sha256(frame).digest()
    nonce = hmac.new(key, seed, hashlib.sha256).digest()[:NONCE_SIZE]
    return nonce + AESGCM(key).encrypt(nonce, frame, _aad(image, index))


def decrypt_chunk(key: bytes, image: str, index: int, stored: bytes) -> bytes:
    if len(stored) < OVERHEAD:
        raise BundleError(f"is {len(stored)} bytes, too short for an encrypted chunk")
    try:
        return AESGCM(key).decrypt(stored[:NONCE_SIZE], stored[NONCE_SIZE:], _aad(image, index))
    except InvalidTag:
        raise BundleError("does not decrypt (AES-GCM tag mismatch)") from None


@dataclass(frozen=True)
class RecipientEntry:
    """One `recipient` line of the signature block."""

    key_id: str
    method: str
    value: bytes


def _ctr(key: bytes, data: bytes) -> bytes:
    """AES-256-CTR with a zero IV: encryption and decryption are the same operation."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _hkdf(secret: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_SIZE, salt=None, info=WRAP_INFO).derive(secret)


def wrap_key(content_key: bytes, recipient: PublicKey) -> RecipientEntry:
    """`content_key` encrypted for `recipient` (an RSA or P-256/P-384 public key)."""
    identifier = key_id(recipient)
    if isinstance(recipient, rsa.RSAPublicKey):
        oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
        return RecipientEntry(identifier, "rsa-oaep-sha256", recipient.encrypt(content_key, oaep))
    if isinstance(recipient, ec.EllipticCurvePublicKey):
        ephemeral = ec.generate_private_key(recipient.curve)
        mask = _hkdf(ephemeral.exchange(ec.ECDH(), recipient))
        point = ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        method = f"ecdh-p{recipient.curve.key_size}-hkdf-sha256"
        return RecipientEntry(identifier, method, point + _ctr(mask, content_key))
    raise KeyError_("recipients must have RSA or ECDSA P-256/P-384 keys (Ed25519 cannot encrypt)")


def unwrap_key(entry: RecipientEntry, private_key: PrivateKey) -> bytes:
    """The content key from `entry` with the recipient's private key; KeyError_ if not."""
    try:
        if entry.method == "rsa-oaep-sha256" and isinstance(private_key, rsa.RSAPrivateKey):
            oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
            return private_key.decrypt(entry.value, oaep)
        curve = _METHODS.get(entry.method)
        if (
            curve is not None
            and isinstance(private_key, ec.EllipticCurvePrivateKey)
            and private_key.curve.name == curve.name
        ):
            point, wrapped = entry.value[:-KEY_SIZE], entry.value[-KEY_SIZE:]
            ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
            mask = _hkdf(private_key.exchange(ec.ECDH(), ephemeral))
            return _ctr(mask, wrapped)
    except ValueError:
        pass
    raise KeyError_(f"cannot unwrap the content key of recipient {entry.key_id} ({entry.method})")


def render_recipient(entry: RecipientEntry) -> str:
    return f"recipient {entry.key_id} {entry.method} {base64.b64encode(entry.value).decode()}"


def parse_recipient(line: str) -> RecipientEntry | None:
    """A `recipient` line of the signature block, or None when it is not a valid one."""
    fields = line.split(" ")
    if len(fields) != 4 or fields[0] != "recipient" or fields[2] not in _METHODS:
        return None
    if not _KEY_ID.fullmatch(fields[1]):
        return None
    try:
        value = base64.b64decode(fields[3], validate=True)
    except ValueError:
        return None
    if base64.b64encode(value).decode("ascii") != fields[3]:
        return None
    return RecipientEntry(fields[1], fields[2], value)


def content_key_for(
    lines: tuple[str, ...], private_key: PrivateKey, commitment: str, source: str
) -> bytes:
    """Find the recipient line for `private_key` and unwrap the content key it holds."""
    identifier = key_id(private_key.public_key())
    for line in lines:
        entry = parse_recipient(line)
        if entry is None or entry.key_id != identifier:
            continue
        content_key = unwrap_key(entry, private_key)
        if key_commitment(content_key) != commitment:
            raise BundleError(
                f"{source}: the content key wrapped for {identifier} is not the one the "
                "signed manifest commits to"
            )
        return content_key
    raise KeyError_(f"{source}: the bundle is not encrypted for key {identifier}")


def load_decryption_key(path: Path) -> DecryptionKey:
    """A recipient's private key (PEM), or a content key file (32 bytes, raw or hex)."""
    from avobuild.bundle.keys import load_private_key

    try:
        data = path.read_bytes()
    except OSError as error:
        raise KeyError_(f"{path}: cannot read decryption key: {error.strerror or error}") from None
    if b"PRIVATE KEY-----" in data:
        return load_private_key(path)
    return load_content_key(path)
