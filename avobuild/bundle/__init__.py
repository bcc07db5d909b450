"""Signed `.avb` update bundles: the manifest, keys, signatures and the container format.

The byte layout is specified in docs/bundle-format.md; `format` reads and writes it,
`manifest` and `sign` encode its two text regions, `keys` loads signing keys and keyrings.
"""
