"""Signed `.avb` update bundles: the manifest, keys, signatures and the container format.

The byte layout is specified in docs/bundle-format.md; `reader` reads it and `writer` writes
it (`header` is the header both share, `info` describes a bundle), `manifest` and `sign`
encode its two text regions, `keys` loads signing keys and keyrings, `x509` checks signer
certificates, `verify` checks a signature block against a keyring, `signing` is the signing
plan every signing step takes, `pkcs11` signs with HSM keys, `resign` signs existing bundles
(offline signing, re-signing) and `crypt` encrypts payloads. docs/signing.md is the
operator's guide to all of it.
"""
