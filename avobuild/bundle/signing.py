"""The signing plan: who signs, which certificates travel along, for whom a payload is encrypted.

A `SigningPlan` is built once, from a recipe's `[signing]` table or from command-line
options, and every signing operation takes it: `bundle create`, `bundle resign`, `delta
create`, and anything else that signs bytes with the signature-block format (a repository
index: `plan.sign(data)`, verified like a manifest by `verify.verify_all_signatures`). The
plan holds only names and values (paths, `pkcs11:` URIs, the module and the PIN): the
library never reads the environment; the command line does, and puts what it found here.

Opening the plan (`open_material`) loads the key files, opens the tokens (closed again when
the `with` block ends), reads the certificates and the encryption recipients, and checks
all of it before a single byte is compressed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from avobuild.bundle import crypt
from avobuild.bundle.keys import (
    PublicKey,
    load_certificates,
    load_private_key,
    load_signer_identity,
)
from avobuild.bundle.sign import (
    CertificateEntry,
    KeySigner,
    SignatureBlock,
    Signer,
    sign_manifest_with,
)
from avobuild.bundle.x509 import certificate_entry
from avobuild.errors import BundleError
from avobuild.model.recipe import SigningConfig


@dataclass(frozen=True)
class SigningPlan:
    """Signers and encryption of what is about to be signed; frozen, built once.

    `keys` are PEM private key files, `pkcs11` token key URIs opened with `pkcs11_module`
    and `pkcs11_pin` unless a URI names its own (module-path=, pin-value=, pin-source=);
    `certificates` are PEM files (signer first, then intermediates) carried in the block;
    `recipients` are public keys or certificates the payload is encrypted for, and
    `encryption_key` a content key file (32 bytes, raw or hex) to encrypt with instead of a
    random one. `unsigned` makes a bundle to be signed offline (then no signer is allowed).
    """

    keys: tuple[Path, ...] = ()
    pkcs11: tuple[str, ...] = ()
    pkcs11_module: Path | None = None
    pkcs11_pin: str | None = field(default=None, repr=False)
    certificates: tuple[Path, ...] = ()
    recipients: tuple[Path, ...] = ()
    encryption_key: Path | None = None
    unsigned: bool = False

    def __post_init__(self) -> None:
        if self.unsigned and self.has_signers:
            raise BundleError("an unsigned bundle cannot be given signing keys")

    @classmethod
    def from_recipe(cls, signing: SigningConfig) -> SigningPlan:
        """The plan of a recipe's `[signing]` table: keys, token keys, module, certificates
        (`dataclasses.replace` adds a PIN or recipients)."""
        return cls(
            keys=signing.keys,
            pkcs11=signing.pkcs11,
            pkcs11_module=signing.pkcs11_module,
            certificates=signing.certificates,
        )

    @property
    def has_signers(self) -> bool:
        return bool(self.keys or self.pkcs11)

    @contextmanager
    def signers(self) -> Iterator[tuple[Signer, ...]]:
        """Every signer of the plan, key files first; tokens are closed afterwards."""
        signers: list[Signer] = [KeySigner(load_private_key(path)) for path in self.keys]
        with ExitStack() as stack:
            if self.pkcs11:
                from avobuild.bundle.pkcs11 import Pkcs11Signer

                for uri in self.pkcs11:
                    signer = Pkcs11Signer(uri, self.pkcs11_module, self.pkcs11_pin)
                    signers.append(stack.enter_context(signer))
            yield tuple(signers)

    def certificate_entries(self) -> tuple[CertificateEntry, ...]:
        """The `certificate` lines of every certificate file, in order."""
        return tuple(
            certificate_entry(certificate)
            for path in self.certificates
            for certificate in load_certificates(path)
        )

    def sign(self, data: bytes) -> SignatureBlock:
        """A signature block over `data` by every signer, with the plan's certificates: the
        same format and verification as a bundle's (docs/bundle-format.md, section 4)."""
        if not self.has_signers:
            raise BundleError("no signing key given (pass a key or a pkcs11: URI)")
        with self.signers() as signers:
            return sign_manifest_with(data, signers, self.certificate_entries())

    @contextmanager
    def open_material(self) -> Iterator[SigningMaterial]:
        """Everything a bundle writer needs, loaded and checked; tokens stay open inside."""
        if not self.unsigned and not self.has_signers:
            raise BundleError("no signing key given (pass a key, or make an unsigned bundle)")
        certificates = self.certificate_entries()
        recipients = tuple(load_signer_identity(path)[0] for path in self.recipients)
        content_key = (
            crypt.load_content_key(self.encryption_key) if self.encryption_key is not None else None
        )
        if recipients and content_key is None:
            content_key = secrets.token_bytes(crypt.KEY_SIZE)
        with self.signers() as signers:
            yield SigningMaterial(signers, certificates, self.unsigned, content_key, recipients)


@dataclass(frozen=True)
class SigningMaterial:
    """An opened plan: signers ready to sign, certificate lines, the content key (None: the
    payload stays clear) and the recipient keys it is wrapped for."""

    signers: tuple[Signer, ...]
    certificates: tuple[CertificateEntry, ...]
    unsigned: bool
    content_key: bytes | None
    recipients: tuple[PublicKey, ...]
