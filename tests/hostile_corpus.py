"""The cases of the differential corpus (tests/test_differential.py), built from
tests/hostile_bundles.py: header, signature block, manifest, payload framing, delta stream.

`build_corpus` returns (name, bundle bytes) pairs; names say what was broken and where
(first, middle or last line of its region). The corpus is generated from a seed at test time.
"""

from __future__ import annotations

import lzma
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hostile_bundles import (
    CHUNK,
    SKIPPABLE,
    DeltaBase,
    Draft,
    Op,
    Signer,
    b64,
    bsdiff_lz,
    bz2_of_lz,
    delta_draft,
    ecdsa_signer,
    frame,
    full_draft,
    head_lines,
    make_delta_squashfs,
    make_delta_v2,
    raw_frame,
    sha,
    stream_draft,
    stream_frames,
    with_content_size,
    with_dictionary_id,
)

Case = tuple[str, bytes]
BIG = "9223372036854775808"  # 2^63: one past the largest number the format allows
MAX = "9223372036854775807"


@dataclass(frozen=True)
class Context:
    trusted: Signer  # the device's Ed25519 key
    trusted_ecdsa: Signer  # the device's P-256 key
    untrusted: Signer
    ecdsa_private: object
    image: bytes  # a full image that fits the slot
    slot_size: int
    delta: DeltaBase  # from the running slot's first bytes
    delta_data_last: DeltaBase
    rng: random.Random


def positions(count: int) -> dict[str, int]:
    """First, middle and last index of a region of `count` lines."""
    return {"first": 0, "middle": count // 2, "last": count - 1}


def _numbers(line: bytes) -> list[int]:
    return [i for i, word in enumerate(line.split(b" ")) if word.isdigit()]


def _set_word(line: bytes, index: int, value: bytes) -> bytes:
    words = line.split(b" ")
    words[index] = value
    return b" ".join(words)


# Ways to spoil one text line, shared by the manifest and the delta stream.
LINE_MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "extra-field": lambda line: line + b" 0",
    "missing-field": lambda line: line.rsplit(b" ", 1)[0],
    "double-space": lambda line: line.replace(b" ", b"  ", 1),
    "trailing-space": lambda line: line + b" ",
    "leading-space": lambda line: b" " + line,
    "tab": lambda line: line.replace(b" ", b"\t", 1),
    "cr": lambda line: line + b"\r",
    "nul": lambda line: line[:-1] + b"\x00" + line[-1:],
    "0xff": lambda line: line + b"\xff",
    "escape": lambda line: line + b"\x1b[2J",
    "uppercase-keyword": lambda line: (
        line.split(b" ", 1)[0].upper() + line[len(line.split(b" ", 1)[0]) :]
    ),
}
# Ways to spoil a number, applied to each numeric field.
NUMBER_MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "leading-zero": lambda word: b"0" + word,
    "octal-looking": lambda word: b"0" + word if word != b"0" else b"010000",
    "negative": lambda word: b"-" + word,
    "plus": lambda word: b"+" + word,
    "2^63": lambda _word: BIG.encode(),
    "hex": lambda word: b"0x" + word,
    "empty-ish": lambda _word: b"-0",
}


def build_corpus(ctx: Context) -> list[Case]:
    cases: list[Case] = []
    for group in (
        header_cases,
        block_cases,
        manifest_cases,
        payload_cases,
        stream_cases,
        delta_cases,
        delta_v2_cases,
        delta_squashfs_cases,
    ):
        cases.extend(group(ctx))
    names = [name for name, _ in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


def base_full(ctx: Context, **options: object) -> Draft:
    return full_draft(ctx.image, (ctx.trusted,), **options)  # type: ignore[arg-type]


def base_delta(ctx: Context, base: DeltaBase | None = None, **stream: object) -> Draft:
    base = base or ctx.delta
    return delta_draft(base.stream(**stream), base.source_ref, base.target_ref, (ctx.trusted,))


# --- header -------------------------------------------------------------------------------------


def header_cases(ctx: Context) -> Iterator[Case]:
    good = base_full(ctx).render()
    manifest_size, block_size = int(good[12:22]), int(good[23:33])
    yield "valid-full", good
    yield "valid-delta", base_delta(ctx).render()
    yield "header-magic", b"AVOBUNDLX" + good[9:]
    yield "header-format-2", good[:10] + b"2" + good[11:]
    yield "header-lowercase", b"avobundle" + good[9:]
    yield "header-no-lf", good[:33] + b" " + good[34:]
    yield "header-sign", good[:12] + b"+" + good[13:]
    yield "header-space-padded", good[:12] + b" " + good[13:]
    yield "header-manifest-zero", b"AVOBUNDLE 1 0000000000 %010d\n" % block_size + good[34:]
    yield "header-block-zero", b"AVOBUNDLE 1 %010d 0000000000\n" % manifest_size + good[34:]
    yield "header-manifest-over-16M", b"AVOBUNDLE 1 0016777217 %010d\n" % block_size + good[34:]
    yield "header-block-over-1M", b"AVOBUNDLE 1 %010d 0001048577\n" % manifest_size + good[34:]
    yield (
        "header-manifest-short",
        b"AVOBUNDLE 1 %010d %010d\n" % (manifest_size - 1, block_size + 1) + good[34:],
    )
    yield (
        "header-manifest-long",
        b"AVOBUNDLE 1 %010d %010d\n" % (manifest_size + 1, block_size - 1) + good[34:],
    )
    yield (
        "header-octal-looking",
        b"AVOBUNDLE 1 %010o %010d\n" % (manifest_size, block_size) + good[34:],
    )
    yield (
        "header-11-digits",
        b"AVOBUNDLE 1 0%010d %010d\n" % (manifest_size, block_size) + good[34:],
    )
    yield "header-truncated", good[:20]
    yield "empty-file", b""
    yield "truncated-in-manifest", good[: 34 + manifest_size // 2]
    yield "truncated-in-block", good[: 34 + manifest_size + block_size // 2]


# --- signature block ------------------------------------------------------------------------------


def block_cases(ctx: Context) -> Iterator[Case]:
    draft = base_full(ctx)
    manifest = draft.manifest()
    good = ctx.trusted.line(manifest).encode()
    other = ctx.untrusted.line(manifest).encode()
    ecdsa = ctx.trusted_ecdsa.line(manifest).encode()

    def with_block(
        name: str, lines: list[bytes], *, head: bytes = b"avobuild-signatures 1"
    ) -> Case:
        return name, draft.copy(block_lines=lines, block_head=head).render()

    yield with_block("block-head-version-2", [good], head=b"avobuild-signatures 2")
    yield with_block("block-head-01", [good], head=b"avobuild-signatures 01")
    yield with_block("block-head-missing", [good], head=good)
    yield with_block("block-ecdsa-trusted", [ecdsa])
    yield with_block("block-both-trusted", [good, ecdsa])
    yield with_block("block-untrusted-only", [other])
    yield with_block("block-untrusted-and-trusted", [other, good])
    yield with_block("block-no-signature", [])
    yield with_block("block-duplicate-trusted", [good, good])
    yield with_block("block-duplicate-untrusted", [other, good, other])
    forged = good[:-8] + (b"AAAAAAA=" if not good.endswith(b"AAAAAAA=") else b"BBBBBBB=")
    yield with_block("block-bad-trusted-signature", [forged])
    wrong = ctx.trusted.line(manifest + b"x\n").encode()
    yield with_block("block-signature-of-other-manifest", [wrong])
    algorithm_swap = good.replace(b"signature ed25519", b"signature ecdsa-p256-sha256", 1)
    yield with_block("block-trusted-key-other-algorithm", [algorithm_swap, ecdsa])
    yield with_block("block-unknown-algorithm", [good.replace(b"ed25519", b"ed448", 1), ecdsa])
    yield with_block("block-unknown-keyword", [good, b"comment made-by ci-42"])
    yield with_block(
        "block-recipient-line", [good, b"recipient " + b"a" * 64 + b" rsa-oaep-sha256 AAAA"]
    )
    high_s = ecdsa_signer(ctx.ecdsa_private, high_s=True).line(manifest).encode()  # type: ignore[arg-type]
    yield with_block("block-ecdsa-high-s", [high_s])
    # Line syntax, for a line first, in the middle and last in the block.
    spoiled = {
        "empty": b"",
        "double-space": other.replace(b" ", b"  ", 1),
        "trailing-space": other + b" ",
        "tab": other.replace(b" ", b"\t", 1),
        "cr": other + b"\r",
        "0xff": b"comment \xff",
        "escape-key-id": b"signature ed25519 \x1b[31m" + b"a" * 60 + b" AAAA",
        "keyword-uppercase": b"Signature" + other[9:],
        "keyword-33-chars": b"k" * 33 + b" value",
        "extra-field": other + b" x",
        "missing-field": other.rsplit(b" ", 1)[0],
        "algorithm-uppercase": other.replace(b"ed25519", b"Ed25519", 1),
        "key-id-63": other.replace(
            ctx.untrusted.key_id.encode(), ctx.untrusted.key_id[:63].encode()
        ),
        "key-id-uppercase": other.replace(
            ctx.untrusted.key_id.encode(), ctx.untrusted.key_id.upper().encode()
        ),
        "base64-unpadded": other.rstrip(b"="),
        "base64-noncanonical": other[:-3] + b"R=="
        if other.endswith(b"Q==")
        else other[:-3] + b"B==",
        "base64-bad-char": other[:-4] + b"*" + other[-3:],
        "ed25519-63-bytes": b"signature ed25519 "
        + ctx.untrusted.key_id.encode()
        + b" "
        + b64(bytes(63)).encode(),
        "ed25519-65-bytes": b"signature ed25519 "
        + ctx.untrusted.key_id.encode()
        + b" "
        + b64(bytes(65)).encode(),
    }
    for what, line in spoiled.items():
        for where, lines in (
            ("first", [line, good]),
            ("middle", [other, line, good]),
            ("last", [good, line]),
        ):
            if what == "empty" and where == "last":
                lines = [good, b"comment", b""]
            yield with_block(f"block-{what}-{where}", lines)
    # ECDSA encodings of an untrusted key: one spelling only.
    ders = {
        "canonical": bytes([0x30, 8, 2, 2, 0x12, 0x34, 2, 2, 0x56, 0x78]),
        "leading-zero": bytes([0x30, 9, 2, 3, 0, 0x12, 0x34, 2, 2, 0x56, 0x78]),
        "negative": bytes([0x30, 8, 2, 2, 0x92, 0x34, 2, 2, 0x56, 0x78]),
        "long-length": bytes([0x30, 0x81, 8, 2, 2, 0x12, 0x34, 2, 2, 0x56, 0x78]),
        "trailing-byte": bytes([0x30, 8, 2, 2, 0x12, 0x34, 2, 2, 0x56, 0x78, 0]),
        "wrong-length": bytes([0x30, 9, 2, 2, 0x12, 0x34, 2, 2, 0x56, 0x78]),
        "zero-r": bytes([0x30, 7, 2, 1, 0, 2, 2, 0x56, 0x78]),
        "73-bytes": bytes([0x30, 71, 2, 34, 0, *([0x80] * 33), 2, 33, 0, *([0x10] * 32)]),
    }
    for what, der in ders.items():
        line = (
            b"signature ecdsa-p256-sha256 "
            + ctx.untrusted.key_id.encode()
            + b" "
            + b64(der).encode()
        )
        yield with_block(f"block-ecdsa-der-{what}", [line, good])
    # Limits: counts and sizes just inside and just past them.
    rng = random.Random(7)

    def unknown_signers(count: int) -> list[bytes]:
        return [
            f"signature ed25519 {rng.randbytes(32).hex()} {b64(bytes(64))}".encode()
            for _ in range(count)
        ]

    yield with_block("block-32-signatures", [*unknown_signers(31), good])
    yield with_block("block-33-signatures", [*unknown_signers(32), good])
    yield with_block("block-256-lines", [good, *[b"comment %d" % i for i in range(255)]])
    yield with_block("block-257-lines", [good, *[b"comment %d" % i for i in range(256)]])
    yield with_block("block-line-22528", [good, b"comment " + b"x" * (22528 - 9)])
    yield with_block("block-line-22529", [good, b"comment " + b"x" * (22528 - 8)])
    recipient = b"recipient " + b"e" * 64 + b" rsa-oaep-sha256 AAAA"
    yield with_block("block-128-recipients", [good, *[recipient] * 128])
    yield with_block("block-129-recipients", [good, *[recipient] * 129])
    adversarial = [
        f"signature e {random.Random(i).randbytes(32).hex()} AAAA".encode() for i in range(12786)
    ]
    yield with_block("block-12787-short-lines", [good, *adversarial])

    def certificate(der: bytes, key: str | None = None) -> bytes:
        return f"certificate {key or rng.randbytes(32).hex()} {b64(der)}".encode()

    yield with_block("block-certificate", [good, certificate(rng.randbytes(800))])
    yield with_block("block-certificate-16384", [good, certificate(rng.randbytes(16384))])
    yield with_block("block-certificate-16385", [good, certificate(rng.randbytes(16385))])
    yield with_block(
        "block-32-certificates", [good, *[certificate(rng.randbytes(40)) for _ in range(32)]]
    )
    yield with_block(
        "block-33-certificates", [good, *[certificate(rng.randbytes(40)) for _ in range(33)]]
    )
    twin = rng.randbytes(300)
    yield with_block(
        "block-same-certificate-twice",
        [good, certificate(twin, "b" * 64), certificate(twin, "b" * 64)],
    )
    yield with_block(
        "block-same-der-other-key-id",
        [good, certificate(twin, "b" * 64), certificate(twin, "c" * 64)],
    )
    yield with_block("block-certificate-bad-key-id", [good, certificate(twin, "B" * 64)])
    yield with_block(
        "block-certificate-unpadded", [good, certificate(rng.randbytes(301)).rstrip(b"=")]
    )
    yield with_block("block-certificate-missing-field", [good, b"certificate " + b"d" * 64])


# --- manifest -----------------------------------------------------------------------------------


def resigned(draft: Draft, lines: list[bytes]) -> bytes:
    return draft.copy(lines=lines).render()


def manifest_cases(ctx: Context) -> Iterator[Case]:
    draft = base_full(ctx)
    head = len(head_lines())
    lines = draft.lines
    # Line mutations on the first, a middle and the last header line and manifest line.
    targets = {
        "first": 0,
        "middle": head // 2,
        "header-last": head - 1,
        "image": head,
        "chunk-first": head + 1,
        "last": len(lines) - 1,
    }
    for what, mutate in LINE_MUTATIONS.items():
        for where, index in targets.items():
            changed = list(lines)
            changed[index] = mutate(changed[index])
            yield f"manifest-{what}-{where}", resigned(draft, changed)
    for where, index in targets.items():
        yield f"manifest-drop-{where}", resigned(draft, lines[:index] + lines[index + 1 :])
        yield f"manifest-repeat-{where}", resigned(draft, lines[: index + 1] + lines[index:])
        yield (
            f"manifest-empty-line-before-{where}",
            resigned(draft, [*lines[:index], b"", *lines[index:]]),
        )
    yield (
        "manifest-swap-name-version",
        resigned(draft, [lines[0], lines[1], lines[3], lines[2], *lines[4:]]),
    )
    yield "manifest-unknown-line-end", resigned(draft, [*lines, b"comment hello"])
    yield (
        "manifest-unknown-line-middle",
        resigned(draft, [*lines[:head], b"comment hello", *lines[head:]]),
    )
    yield "manifest-no-final-lf", draft.copy(manifest_override=draft.manifest()[:-1]).render()
    yield (
        "manifest-crlf",
        draft.copy(manifest_override=draft.manifest().replace(b"\n", b"\r\n")).render(),
    )

    def with_value(index: int, value: str) -> bytes:
        changed = list(lines)
        changed[index] = changed[index].split(b" ", 1)[0] + b" " + value.encode()
        return resigned(draft, changed)

    values = {
        0: ["3", "01", "0", "1.0"],
        1: ["fulll", "Full", "delta"],
        2: ["-diff", "diff prod", "d" * 128, "d" * 129, "diff/prod", "diff$prod", "dïff"],
        3: ["2.0.0+build.7", "v" * 129, ".2", "2.0.0:rc~1@x", "2.0.0\\"],
        4: ["diffprod-x86_64-other", "diffprod-*", "diffprod-x86_6?", "[d]iffprod-x86_64"],
        5: ["0", MAX, BIG, "010", "-1", "+1", "1e3", "99999999999999999999", "1767225600.5"],
        head - 2: ["131072", "32768", "0100000", "65535", "33554432", "16777216"],
        head - 1: ["none", "gzip", "ZSTD", "zstd none"],
    }
    for index, options in values.items():
        keyword = lines[index].split(b" ", 1)[0].decode()
        for number, value in enumerate(options):
            yield f"manifest-{keyword}-value{number}", with_value(index, value)
    # Version 2 policy lines.
    policy_cases = {
        "v2-security-5": ["security-version 5"],
        "v2-security-0": ["security-version 0"],
        "v2-security-010": ["security-version 010"],
        "v2-security-2^63": [f"security-version {BIG}"],
        "v2-min-applier-0.1": ["min-applier-version 0.1"],
        "v2-min-applier-99": ["min-applier-version 99"],
        "v2-min-applier-01": ["min-applier-version 01.2"],
        "v2-min-applier-5-fields": ["min-applier-version 0.0.0.0.1"],
        "v2-min-applier-10-digits": ["min-applier-version 0.1234567890"],
        "v2-expires-future": [f"expires {MAX}"],
        "v2-expires-past": ["expires 1000"],
        "v2-expires-octal": ["expires 0100000000000"],
        "v2-two-policies-swapped": ["expires 4102444800", "security-version 1"],
        "v2-all-policies": [
            "security-version 1",
            "min-applier-version 0.0.1",
            "expires 4102444800",
        ],
        "v2-repeated-policy": ["security-version 1", "security-version 2"],
    }
    for name, policy in policy_cases.items():
        heading = head_lines(version=2, policy=policy)
        yield f"manifest-{name}", resigned(draft, [*heading, *lines[head:]])
    yield "manifest-v2-without-feature", resigned(draft, [*head_lines(version=2), *lines[head:]])
    yield (
        "manifest-v2-glob",
        resigned(draft, [*head_lines(version=2, compatible="diffprod-*"), *lines[head:]]),
    )
    yield (
        "manifest-v2-glob-other",
        resigned(draft, [*head_lines(version=2, compatible="other-*"), *lines[head:]]),
    )
    yield (
        "manifest-v1-with-policy",
        resigned(draft, [*head_lines(policy=["security-version 1"]), *lines[head:]]),
    )
    yield (
        "manifest-encryption",
        resigned(
            draft, [*head_lines(version=2), b"encryption aes-256-gcm " + b"0" * 64, *lines[head:]]
        ),
    )
    # The image line and the chunk lines.
    image_line = lines[head]
    name, size, digest, count = image_line.split(b" ")[1:]
    for value_index, variants in {
        1: [b"Rootfs", b"r" * 33, b"root.fs", b"kernel", b"extensions", b"data"],
        2: [str(int(size) + 1).encode(), str(int(size) - 1).encode(), b"0" + size],
        3: [digest.upper(), digest[:63]],
        4: [str(int(count) + 1).encode(), b"0" + count],
    }.items():
        for variant in variants:
            changed = list(lines)
            changed[head] = _set_word(image_line, value_index, variant)
            yield (
                f"manifest-image-field{value_index}-{variant.hex()[:20]}",
                resigned(draft, changed),
            )
    chunk_lines = range(head + 1, len(lines))
    for where, offset in positions(len(chunk_lines)).items():
        index = head + 1 + offset
        chunk = lines[index]
        for what, variant in {
            "other-image": _set_word(chunk, 1, b"kernel"),
            "index-leading-zero": _set_word(chunk, 2, b"0" + chunk.split(b" ")[2]),
            "index-skipped": _set_word(chunk, 2, str(offset + 1).encode()),
            "stored-zero": _set_word(chunk, 3, b"0"),
            "stored-leading-zero": _set_word(chunk, 3, b"0" + chunk.split(b" ")[3]),
            "stored-over-bound": _set_word(chunk, 3, str(CHUNK + CHUNK // 128 + 513).encode()),
            "sha-wrong": _set_word(chunk, 4, sha(chunk).encode()),
        }.items():
            changed = list(lines)
            changed[index] = variant
            yield f"manifest-chunk-{what}-{where}", resigned(draft, changed)
    yield "manifest-two-images-same-name", resigned(draft, [*lines, *lines[head:]])
    empty = f"image rootfs 0 {sha(b'')} 0".encode()
    yield "manifest-empty-image", draft.copy(lines=[*lines[:head], empty], payload=[]).render()
    yield (
        "manifest-empty-image-bad-sha",
        draft.copy(lines=[*lines[:head], _set_word(empty, 3, b"0" * 64)], payload=[]).render(),
    )
    yield "manifest-no-image", draft.copy(lines=lines[:head], payload=[]).render()
    big = full_draft(bytes(ctx.slot_size + CHUNK), (ctx.trusted,))
    yield "manifest-image-larger-than-slot", big.render()
    exact = full_draft(ctx.rng.randbytes(ctx.slot_size), (ctx.trusted,))
    yield "manifest-image-fills-slot", exact.render()
    full_with_source = [*lines[: head + 1], b"source 10 " + b"0" * 64, *lines[head + 1 :]]
    yield "manifest-full-with-source-line", resigned(draft, full_with_source)


# --- payload framing ------------------------------------------------------------------------------


def payload_cases(ctx: Context) -> Iterator[Case]:
    draft = base_full(ctx)
    count = len(draft.payload)
    pieces = [ctx.image[i : i + CHUNK] for i in range(0, len(ctx.image), CHUNK)]
    encodings: dict[str, Callable[[bytes], bytes]] = {
        "two-frames": lambda data: frame(data[: len(data) // 2]) + frame(data[len(data) // 2 :]),
        "frame-and-empty-frame": lambda data: frame(data) + frame(b""),
        "frame-and-skippable": lambda data: frame(data) + SKIPPABLE,
        "skippable-and-frame": lambda data: SKIPPABLE + frame(data),
        "frame-and-garbage": lambda data: frame(data) + b"\x00\x01",
        "no-content-size": lambda data: frame(data, content_size=False),
        "content-size-short": lambda data: with_content_size(frame(data), len(data) - 1),
        "content-size-long": lambda data: with_content_size(frame(data), len(data) + 1),
        "checksum": lambda data: frame(data, checksum=True),
        "dictionary-id": lambda data: with_dictionary_id(frame(data)),
        "raw-blocks": lambda data: raw_frame(data),
        "corrupt": lambda data: frame(data)[:-3] + b"\xff\xff\xff",
        "not-zstd": lambda data: data[:100],
    }
    for what, encode in encodings.items():
        for where, index in positions(count).items():
            stored = list(draft.payload)
            stored[index] = encode(pieces[index])
            yield f"payload-{what}-{where}", _with_payload(draft, stored)
    oversized = full_draft(ctx.image, (ctx.trusted,), chunk_size=4 * CHUNK)
    big_pieces = [ctx.image[i : i + 4 * CHUNK] for i in range(0, len(ctx.image), 4 * CHUNK)]
    stored = list(oversized.payload)
    stored[0] = raw_frame(big_pieces[0], block=4 * CHUNK)
    yield "payload-oversized-block", _with_payload(oversized, stored)
    for where, index in positions(count).items():
        stored = list(draft.payload)
        stored[index] = stored[index][:-1] + bytes([stored[index][-1] ^ 1])
        yield f"payload-flipped-unsigned-{where}", draft.copy(payload=stored).render()
        cut = b"".join(draft.payload[: index + 1])[:-5]
        yield f"payload-truncated-{where}", draft.copy(payload=[cut]).render()
    yield "payload-trailing-byte", draft.copy(trailer=b"\n").render()
    yield "payload-trailing-chunk", draft.copy(trailer=draft.payload[-1]).render()
    wrong_hash = list(draft.lines)
    head = len(head_lines())
    wrong_hash[head] = _set_word(wrong_hash[head], 3, sha(b"other").encode())
    yield "payload-image-hash-wrong", resigned(draft, wrong_hash)
    none = full_draft(ctx.image, (ctx.trusted,), compression="none")
    yield "payload-none-valid", none.render()
    stored = list(none.payload)
    stored[-1] = stored[-1] + b"x"
    yield "payload-none-long-chunk", _with_payload(none, stored)


def _with_payload(draft: Draft, stored: list[bytes]) -> bytes:
    """The draft with new stored chunks, the chunk lines (size, sha) made to match."""
    lines = list(draft.lines)
    index = 0
    for number, line in enumerate(lines):
        if line.startswith(b"chunk "):
            words = line.split(b" ")
            words[3] = str(len(stored[index])).encode()
            words[4] = sha(stored[index]).encode()
            lines[number] = b" ".join(words)
            index += 1
    return draft.copy(lines=lines, payload=stored).render()


# --- zstd-stream payloads (manifest version 3) ----------------------------------------------------


def stream_cases(ctx: Context) -> Iterator[Case]:
    """Names start with `stream-` (tests/test_differential.py runs all of them in the fast
    suite) or `valid-stream` (accepted)."""
    signers = (ctx.trusted,)
    draft = stream_draft(ctx.image, signers)
    count = len(draft.payload)
    yield "valid-stream", draft.render()
    yield "valid-stream-one-frame", stream_draft(ctx.image, signers, frame_chunks=8).render()
    yield "valid-stream-frame-per-chunk", stream_draft(ctx.image, signers, frame_chunks=1).render()
    # The whole stream cut at other points than its blocks' ends: readers take each chunk's
    # data from the decoder's output, wherever the stored bytes were cut.
    joined = b"".join(stream_frames(ctx.image, CHUNK, 8))
    step = -(-len(joined) // count)
    recut = [joined[i : i + step] for i in range(0, len(joined), step)]
    if len(recut) == count:
        yield (
            "valid-stream-cut-inside-blocks",
            stream_draft(ctx.image, signers, frame_chunks=8, stored=recut).render(),
        )
    for where, index in positions(count).items():
        stored = list(draft.payload)
        stored[index] = stored[index][:-1] + bytes([stored[index][-1] ^ 1])
        yield f"stream-flipped-unsigned-{where}", draft.copy(payload=stored).render()
        cut = b"".join(draft.payload[: index + 1])[:-5]
        yield f"stream-truncated-{where}", draft.copy(payload=[cut]).render()
        lines = list(draft.lines)
        line = len(lines) - count + index
        lines[line] = _set_word(lines[line], 5, sha(b"other").encode())
        yield f"stream-data-hash-wrong-{where}", resigned(draft, lines)
        lines = list(draft.lines)
        lines[line] = lines[line].rsplit(b" ", 1)[0]
        yield f"stream-no-data-hash-{where}", resigned(draft, lines)
    lines = list(draft.lines)
    lines[len(lines) - count - 1] = _set_word(
        lines[len(lines) - count - 1], 3, sha(b"other").encode()
    )
    yield "stream-image-hash-wrong", resigned(draft, lines)
    yield "stream-trailing-byte", draft.copy(trailer=b"\x00").render()
    garbage = list(draft.payload)
    garbage[-1] += b"\x00\x01\x02"
    yield "stream-garbage-after-frame", stream_draft(ctx.image, signers, stored=garbage).render()
    # 2 chunks of 64 KiB need a 128 KiB window; the manifest allows 64 KiB.
    yield (
        "stream-window-too-large",
        stream_draft(
            ctx.image,
            signers,
            stored=stream_frames(ctx.image, CHUNK, 2, window_log=17),
            window_log=16,
        ).render(),
    )
    no_size = stream_frames(ctx.image, CHUNK, 2, content_size=False)
    yield "stream-no-content-size", stream_draft(ctx.image, signers, stored=no_size).render()
    # Frames of 2 chunks under a manifest that says 4: the third chunk starts a frame early.
    yield (
        "stream-frames-shorter-than-declared",
        stream_draft(
            ctx.image, signers, stored=stream_frames(ctx.image, CHUNK, 2), frame_chunks=4
        ).render(),
    )
    yield (
        "stream-frames-longer-than-declared",
        stream_draft(
            ctx.image, signers, stored=stream_frames(ctx.image, CHUNK, 4), frame_chunks=2
        ).render(),
    )
    # Where a frame ends, exactly (5.2): the zstd command skips a skippable frame silently
    # and decodes a second frame, so the shell reader walks the block headers itself.
    tail = list(draft.payload)
    tail[1] += SKIPPABLE
    yield "stream-skippable-after-frame-end", stream_draft(ctx.image, signers, stored=tail).render()
    tail = list(draft.payload)
    tail[-1] += SKIPPABLE
    last = stream_draft(ctx.image, signers, stored=tail).render()
    yield "stream-skippable-after-last-frame", last
    tail = list(draft.payload)
    tail[2] = SKIPPABLE + tail[2]
    yield "stream-skippable-before-frame", stream_draft(ctx.image, signers, stored=tail).render()
    # Compressible data, so that a whole frame fits the first chunk's stored-size bound: the
    # frame ends inside chunk 0 and chunk 1 (the frame's last) holds something else.
    text = b"".join(b"line %06d of a compressible image\n" % i for i in range(9000))[: 5 * CHUNK]
    merged = stream_frames(text, CHUNK, 2)
    for name, second in (
        ("skippable-as-chunk", SKIPPABLE),
        ("empty-frame-as-chunk", frame(b"")),
        ("frame-ends-mid-chunk", SKIPPABLE + merged[1][-1:]),
    ):
        stored = [merged[0] + merged[1], second, *merged[2:]]
        if name == "frame-ends-mid-chunk":
            stored[0] += SKIPPABLE
        yield f"stream-{name}", stream_draft(text, signers, stored=stored).render()
    yield (
        "valid-stream-compressible",
        stream_draft(text, signers, stored=merged).render(),
    )
    independent = [frame(ctx.image[i : i + CHUNK]) for i in range(0, len(ctx.image), CHUNK)]
    yield "stream-independent-frames", stream_draft(ctx.image, signers, stored=independent).render()
    yield "stream-in-manifest-version-2", stream_draft(ctx.image, signers, version=2).render()
    yield "stream-zstd-in-manifest-version-3", full_draft(ctx.image, signers, version=3).render()
    for bad in (
        "zstd-stream 2",
        "zstd-stream 0 17",
        "zstd-stream 2 9",
        "zstd-stream 2 28",
        "zstd-stream 02 17",
        "zstd-stream 2 17 0",
        "zstd 2 17",
    ):
        yield (
            f"stream-compression-{bad.replace(' ', '-')}",
            stream_draft(ctx.image, signers, compression=bad).render(),
        )


# --- delta streams ------------------------------------------------------------------------------


def delta_cases(ctx: Context) -> Iterator[Case]:
    base = ctx.delta
    ops = list(base.ops)
    where_ops = positions(len(ops))

    def with_ops(new_ops: list[Op], **stream: object) -> bytes:
        return base_delta(ctx, ops=new_ops, **stream).render()

    # Line mutations and number mutations of an op at the start, middle and end.
    for where, index in where_ops.items():
        op = ops[index]
        for what, mutate in LINE_MUTATIONS.items():
            changed = list(ops)
            changed[index] = Op(mutate(op.line), op.payload)
            yield f"delta-{what}-{where}", with_ops(changed)
        for field_index in _numbers(op.line):
            for what, mutate in NUMBER_MUTATIONS.items():
                words = op.line.split(b" ")
                changed = list(ops)
                changed[index] = Op(
                    _set_word(op.line, field_index, mutate(words[field_index])), op.payload
                )
                yield f"delta-{where}-field{field_index}-{what}", with_ops(changed)
        changed = list(ops)
        changed[index] = Op(op.line.replace(op.line.split(b" ")[0], b"move", 1), op.payload)
        yield f"delta-unknown-op-{where}", with_ops(changed)
        yield f"delta-dropped-{where}", with_ops(ops[:index] + ops[index + 1 :])
        yield f"delta-repeated-{where}", with_ops(ops[: index + 1] + ops[index:])
        yield f"delta-truncated-after-{where}", _truncated_delta(ctx, index)
        yield (
            f"delta-long-line-{where}",
            with_ops(
                [*ops[:index], Op(op.line + b" " + b"1" * 600, op.payload), *ops[index + 1 :]]
            ),
        )
    # Extents: out of range, overlapping, gaps, zero length (the cases among them).
    first = ops[0].line.split(b" ")
    size = base.target_ref.size
    extent_cases = {
        "zero-octal-length": [ops[0], Op(b"zero 65536 010000"), *ops[2:]],
        "copy-negative-source": [Op(b"copy 0 65536 -67108864 " + first[4]), *ops[1:]],
        "copy-past-source": [
            Op(b"copy 0 65536 %d " % (base.source_ref.size - 100) + first[4]),
            *ops[1:],
        ],
        "copy-length-zero": [Op(b"copy 0 0 0 " + sha(b"").encode()), *ops],
        "zero-length-zero": [ops[0], Op(b"zero 65536 0"), *ops[1:]],
        "overlap-back-one": [ops[0], Op(b"zero 65535 8193"), *ops[2:]],
        "gap-one": [ops[0], Op(b"zero 65537 8191"), *ops[2:]],
        "zero-past-target": [*ops[:-1], Op(b"zero %s %d" % (ops[-1].line.split(b" ")[1], size))],
        "past-target-after-end": [*ops, Op(b"zero %d 4096" % size)],
        "zero-2^63": [ops[0], Op(b"zero 65536 " + BIG.encode()), *ops[2:]],
        "zero-max": [ops[0], Op(b"zero 65536 " + MAX.encode()), *ops[2:]],
        "copy-huge-source": [Op(b"copy 0 65536 " + MAX.encode() + b" " + first[4]), *ops[1:]],
        "split-zero": [ops[0], Op(b"zero 65536 4096"), Op(b"zero 69632 4096"), *ops[2:]],
    }
    for name, new_ops in extent_cases.items():
        yield f"delta-{name}", with_ops(new_ops)
    # Hashes.
    data_index = next(i for i, op in enumerate(ops) if op.line.startswith(b"data "))
    patch_index = next(i for i, op in enumerate(ops) if op.line.startswith(b"patch "))
    for name, index, field_index in (
        ("copy-sha", 0, 4),
        ("data-sha", data_index, 4),
        ("patch-window-sha", patch_index, 5),
        ("patch-sha", patch_index, 7),
    ):
        changed = list(ops)
        changed[index] = Op(
            _set_word(ops[index].line, field_index, sha(b"x").encode()), ops[index].payload
        )
        yield f"delta-wrong-{name}", with_ops(changed)
    patch_words = ops[patch_index].line.split(b" ")
    for name, value_index, value in (
        ("patch-window-past-source", 3, str(base.source_ref.size - 1000).encode()),
        ("patch-window-zero", 4, b"0"),
        ("patch-window-over-16M", 4, b"16777217"),
        ("patch-payload-zero", 6, b"0"),
    ):
        words = list(patch_words)
        words[value_index] = value
        changed = list(ops)
        changed[patch_index] = Op(b" ".join(words), ops[patch_index].payload)
        yield f"delta-{name}", with_ops(changed)
    # Payload framing of data operations (in the middle, and last in a second base).
    for label, delta_base in (("middle", base), ("last", ctx.delta_data_last)):
        base_ops = list(delta_base.ops)
        index = max(i for i, op in enumerate(base_ops) if op.line.startswith(b"data "))
        op = base_ops[index]
        piece = delta_base.target[int(op.line.split(b" ")[1]) :][: int(op.line.split(b" ")[2])]
        for what, payload in {
            "two-frames": frame(piece[:2048]) + frame(piece[2048:]),
            "frame-and-empty-frame": frame(piece) + frame(b""),
            "frame-and-skippable": frame(piece) + SKIPPABLE,
            "skippable-and-frame": SKIPPABLE + frame(piece),
            "frame-and-garbage": frame(piece) + b"\x00",
            "no-content-size": frame(piece, content_size=False),
            "content-size-wrong": with_content_size(frame(piece), len(piece) + 1),
            "dictionary-id": with_dictionary_id(frame(piece)),
            "raw-blocks": raw_frame(piece),
            "payload-over-bound": raw_frame(piece) + bytes(len(piece) // 128 + 600),
        }.items():
            words = op.line.split(b" ")
            words[3] = str(len(payload)).encode()
            changed = list(base_ops)
            changed[index] = Op(b" ".join(words), payload)
            stream = delta_base.stream(changed)
            yield (
                f"delta-data-{what}-{label}",
                delta_draft(
                    stream, delta_base.source_ref, delta_base.target_ref, (ctx.trusted,)
                ).render(),
            )
        if label == "last":
            yield (
                "delta-data-last-valid",
                delta_draft(
                    delta_base.stream(),
                    delta_base.source_ref,
                    delta_base.target_ref,
                    (ctx.trusted,),
                ).render(),
            )
    # The stream's own lines: magic, source, target, end, trailing data.
    source, target = base.source_ref, base.target_ref
    for name, options in {
        "magic-2": {"magic": b"avobuild-delta 2"},
        "magic-01": {"magic": b"avobuild-delta 01"},
        "magic-double-space": {"magic": b"avobuild-delta  1"},
        "magic-missing": {"magic": b"source %d %s" % (source.size, source.sha256.encode())},
        "source-other-size": {
            "refs": (
                b"source %d %s" % (source.size - 1, source.sha256.encode()),
                b"target %d %s" % (target.size, target.sha256.encode()),
            )
        },
        "source-leading-zero": {
            "refs": (
                b"source 0%d %s" % (source.size, source.sha256.encode()),
                b"target %d %s" % (target.size, target.sha256.encode()),
            )
        },
        "target-other-sha": {
            "refs": (
                b"source %d %s" % (source.size, source.sha256.encode()),
                b"target %d %s" % (target.size, sha(b"t").encode()),
            )
        },
        "refs-swapped": {
            "refs": (
                b"target %d %s" % (target.size, target.sha256.encode()),
                b"source %d %s" % (source.size, source.sha256.encode()),
            )
        },
        "end-count-wrong": {"end": b"end %d" % (len(ops) + 1)},
        "end-leading-zero": {"end": b"end 0%d" % len(ops)},
        "end-extra-field": {"end": b"end %d 0" % len(ops)},
        "end-missing": {"end": b""},
        "end-twice": {"end": b"end %d\nend %d" % (len(ops), len(ops))},
        "data-after-end": {"trailer": b"x"},
        "newline-after-end": {"trailer": b"\n"},
    }.items():
        yield f"delta-{name}", with_ops(ops, **options)
    # The manifest's delta lines.
    draft = base_delta(ctx)
    lines = draft.lines
    head = len(head_lines())
    source_line, target_line = lines[head + 1], lines[head + 2]
    for name, changed in {
        "manifest-no-source": [*lines[: head + 1], *lines[head + 2 :]],
        "manifest-no-target": [*lines[: head + 2], *lines[head + 3 :]],
        "manifest-refs-swapped": [*lines[: head + 1], target_line, source_line, *lines[head + 3 :]],
        "manifest-source-other-sha": [
            *lines[: head + 1],
            _set_word(source_line, 2, sha(b"s").encode()),
            *lines[head + 2 :],
        ],
        "manifest-source-larger-than-slot": [
            *lines[: head + 1],
            _set_word(source_line, 1, str(ctx.slot_size + 1).encode()),
            *lines[head + 2 :],
        ],
        "manifest-target-larger-than-slot": [
            *lines[: head + 2],
            _set_word(target_line, 1, str(ctx.slot_size + 1).encode()),
            *lines[head + 3 :],
        ],
        "manifest-target-leading-zero": [
            *lines[: head + 2],
            _set_word(target_line, 1, b"0" + target_line.split(b" ")[1]),
            *lines[head + 3 :],
        ],
        "manifest-type-full": [lines[0], b"type full", *lines[2:]],
    }.items():
        yield f"delta-{name}", resigned(draft, changed)
    # A delta whose stream's chunks are framed badly, like a full image's.
    stored = list(draft.payload)
    stored[0] = frame(base.stream()[:CHUNK]) + SKIPPABLE
    yield "delta-chunk-frame-and-skippable", _with_payload(draft, stored)


def _truncated_delta(ctx: Context, index: int) -> bytes:
    """The stream cut right after op `index`'s line, signed as a whole."""
    base = ctx.delta
    stream = base.stream()
    marker = base.ops[index].line + b"\n"
    cut = stream[: stream.index(marker) + len(marker)]
    return delta_draft(cut, base.source_ref, base.target_ref, (ctx.trusted,)).render()


# --- delta stream version 2: windows and bspatch ------------------------------------------------


def delta_v2_cases(ctx: Context) -> Iterator[Case]:
    base = make_delta_v2(ctx.delta.source, random.Random(7))
    ops = list(base.ops)

    def signed(new_ops: list[Op], **stream: object) -> bytes:
        return delta_draft(
            base.stream(new_ops, **stream), base.source_ref, base.target_ref, (ctx.trusted,)
        ).render()

    def word(index: int, field_index: int, value: bytes) -> list[Op]:
        changed = list(ops)
        changed[index] = Op(_set_word(ops[index].line, field_index, value), ops[index].payload)
        return changed

    yield "delta2-valid", signed(ops)
    yield "delta2-as-version-1", signed(ops, magic=b"avobuild-delta 1")
    windows = [i for i, op in enumerate(ops) if op.line.startswith(b"window ")]
    patches = [i for i, op in enumerate(ops) if op.line.startswith(b"bspatch ")]
    for label, window, patch in zip(("raw", "x86"), windows, patches, strict=True):
        extent = window + 1
        length = ops[window].line.split(b" ")[2]
        payload = ops[patch].payload
        for name, new_ops in {
            "window-sha": word(window, 5, sha(b"w").encode()),
            "window-count-2": word(window, 1, b"2"),
            "window-count-0": word(window, 1, b"0"),
            "window-count-65": word(window, 1, b"65"),
            "window-length-short": word(window, 2, str(int(length) - 1).encode()),
            "window-length-over-16M": word(window, 2, b"16777217"),
            "window-filter-arm": word(window, 3, b"arm"),
            "window-start-leading-zero": word(window, 4, b"01"),
            "extent-past-source": word(extent, 1, str(base.source_ref.size - 10).encode()),
            "extent-2^63": word(extent, 1, BIG.encode()),
            "extent-length-zero": word(extent, 2, b"0"),
            "extent-other-offset": word(
                extent, 1, str(int(ops[extent].line.split(b" ")[1]) + 1).encode()
            ),
            "extent-missing": ops[:extent] + ops[extent + 1 :],
            "extent-keyword": [
                *ops[:extent],
                Op(b"copy" + ops[extent].line[6:]),
                *ops[extent + 1 :],
            ],
            "window-dropped": ops[:window] + ops[extent + 1 :],
            "bspatch-filter-other": word(patch, 3, b"arm64"),
            "bspatch-window-sha": word(patch, 5, sha(b"w").encode()),
            "bspatch-sha": word(patch, 7, sha(b"t").encode()),
            "bspatch-start": word(patch, 4, b"4097"),
            "bspatch-payload-size-short": word(patch, 6, str(len(payload) - 1).encode()),
            "bspatch-payload-zero": word(patch, 6, b"0"),
            "bspatch-length-over-16M": word(patch, 2, b"16777217"),
            "bspatch-extra-field": [
                *ops[:patch],
                Op(ops[patch].line + b" 0", payload),
                *ops[patch + 1 :],
            ],
        }.items():
            yield f"delta2-{label}-{name}", signed(new_ops)
        for name, changed_payload in {
            "magic": b"BSDIFF41" + payload[8:],
            "new-size": payload[:24]
            + (int.from_bytes(payload[24:32], "little") + 1).to_bytes(8, "little")
            + payload[32:],
            "flipped": payload[:40] + bytes([payload[40] ^ 0x55]) + payload[41:],
            "cut": payload[: len(payload) // 2],
            **(lz_payload_cases(payload) if payload.startswith(b"BSDIFFLZ") else {}),
        }.items():
            words = ops[patch].line.split(b" ")
            words[6] = str(len(changed_payload)).encode()
            changed = list(ops)
            changed[patch] = Op(b" ".join(words), changed_payload)
            yield f"delta2-{label}-payload-{name}", signed(changed)
    # A bspatch before any window, and a window at the very end (nothing uses it).
    first = windows[0]
    yield "delta2-bspatch-without-window", signed(ops[:first] + ops[first + 2 :])
    yield "delta2-window-before-end", signed([*ops, ops[windows[1]], ops[windows[1] + 1]])
    yield "delta2-end-counts-windows", signed(ops, end=b"end %d" % len(ops))


def lz_payload_cases(payload: bytes) -> dict[str, bytes]:
    """A BSDIFFLZ patch's streams made wrong one at a time (docs/delta-format.md, 7.5): each
    must be one whole raw LZMA2 stream, within its bound."""
    control_size = int.from_bytes(payload[8:16], "little")
    diff_size = int.from_bytes(payload[16:24], "little")
    new_size = int.from_bytes(payload[24:32], "little")
    streams = [
        payload[32 : 32 + control_size],
        payload[32 + control_size : 32 + control_size + diff_size],
        payload[32 + control_size + diff_size :],
    ]
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
    control, diff, extra = (
        lzma.decompress(part, lzma.FORMAT_RAW, filters=filters) for part in streams
    )

    def lz(data: bytes) -> bytes:
        return lzma.compress(data, lzma.FORMAT_RAW, filters=filters)

    return {
        "lz-control-trailing-byte": bsdiff_lz(
            new_size, b"", b"", b"", streams=[streams[0] + b"\0", *streams[1:]]
        ),
        "lz-extra-empty": bsdiff_lz(new_size, b"", b"", b"", streams=[*streams[:2], b""]),
        "lz-control-partial-triple": bsdiff_lz(new_size, control[:-1], diff, extra),
        "lz-control-over-bound": bsdiff_lz(
            new_size, control + bytes(24 * (new_size // 24 + 2)), diff, extra
        ),
        "lz-diff-over-new-size": bsdiff_lz(new_size, control, diff + bytes(new_size), extra),
        "lz-extra-over-what-is-left": bsdiff_lz(new_size, control, diff, extra + b"x"),
        "lz-bzip2-streams": b"BSDIFFLZ" + bz2_of_lz(payload)[8:],
        "lz-control-size-past-end": payload[:8]
        + (len(payload) - 31).to_bytes(8, "little")
        + payload[16:],
        "lz-streams-swapped": bsdiff_lz(new_size, diff, control, extra),
        # The same patch as BSDIFF40: accepted, the same target.
        "lz-as-bsdiff40": bz2_of_lz(payload),
    }


def delta_squashfs_cases(ctx: Context) -> Iterator[Case]:
    """Version 2's squashfs lines: zstd-version, zwindow and its zextents, recompress and its
    blocks (docs/delta-format.md, section 8)."""
    with tempfile.TemporaryDirectory(prefix="hostile-squashfs-") as work:
        base = make_delta_squashfs(ctx.delta.source, random.Random(8), Path(work))
    ops = list(base.ops)

    def signed(new_ops: list[Op], **stream: object) -> bytes:
        return delta_draft(
            base.stream(new_ops, **stream), base.source_ref, base.target_ref, (ctx.trusted,)
        ).render()

    def word(index: int, field_index: int, value: bytes) -> list[Op]:
        changed = list(ops)
        changed[index] = Op(_set_word(ops[index].line, field_index, value), ops[index].payload)
        return changed

    def at(prefix: bytes, nth: int = 0) -> int:
        return [i for i, op in enumerate(ops) if op.line.startswith(prefix)][nth]

    version, window, extent = at(b"zstd-version "), at(b"zwindow "), at(b"zextent ")
    patch, bspatch = at(b"recompress "), at(b"recompress ", 1)
    block, raw_block, last = patch + 1, patch + 2, bspatch + 1
    number = int(ops[version].line.split(b" ")[1])
    yield "delta2-sq-valid", signed(ops)
    yield "delta2-sq-as-version-1", signed(ops, magic=b"avobuild-delta 1")
    for name, new_ops in {
        "zstd-version-other": word(version, 1, str(number + 1).encode()),
        "zstd-version-leading-zero": word(version, 1, b"0" + str(number).encode()),
        "zstd-version-missing": ops[:version] + ops[version + 1 :],
        "zstd-version-late": [*ops[1:patch], ops[version], *ops[patch:]],
        "zstd-version-twice": [ops[version], *ops],
        "zwindow-sha": word(window, 3, sha(b"w").encode()),
        "zwindow-count-0": word(window, 1, b"0"),
        "zwindow-count-65": word(window, 1, b"65"),
        "zwindow-count-3": word(window, 1, b"3"),
        "zwindow-length-short": word(
            window, 2, str(int(ops[window].line.split(b" ")[2]) - 1).encode()
        ),
        "zwindow-length-over-16M": word(window, 2, b"16777217"),
        "zextent-past-source": word(extent, 1, str(base.source_ref.size - 10).encode()),
        "zextent-2^63": word(extent, 1, BIG.encode()),
        "zextent-raw-sizes-differ": word(extent, 3, b"39999"),
        "zextent-zstd-not-a-frame": word(extent, 4, b"zstd"),
        "zextent-over-1M": word(extent, 2, b"1048577"),
        "zextent-packing-gzip": word(extent, 4, b"gzip"),
        "zextent-other-offset": word(extent, 1, b"200001"),
        "zextent-missing": ops[:extent] + ops[extent + 1 :],
        "zwindow-dropped": ops[:window] + ops[extent + 2 :],
        "recompress-window-sha": word(patch, 6, sha(b"w").encode()),
        "recompress-level-1": word(patch, 4, b"1"),
        "recompress-level-20": word(patch, 4, b"20"),
        "recompress-level-0": word(patch, 4, b"0"),
        "recompress-count-1": word(patch, 3, b"1"),
        "recompress-count-0": word(patch, 3, b"0"),
        "recompress-count-65": word(patch, 3, b"65"),
        "recompress-method-bspatch": word(patch, 5, b"bspatch"),
        "recompress-method-other": word(patch, 5, b"xdelta"),
        "recompress-bspatch-method-patch": word(bspatch, 5, b"patch"),
        "recompress-length-short": word(
            patch, 2, str(int(ops[patch].line.split(b" ")[2]) - 1).encode()
        ),
        "recompress-payload-short": word(
            patch, 7, str(int(ops[patch].line.split(b" ")[7]) - 1).encode()
        ),
        "recompress-payload-zero": word(patch, 7, b"0"),
        "recompress-extra-field": [
            *ops[:patch],
            Op(ops[patch].line + b" 0", ops[patch].payload),
            *ops[patch + 1 :],
        ],
        "block-sha": word(block, 4, sha(b"b").encode()),
        "block-stored-size": word(block, 2, str(int(ops[block].line.split(b" ")[2]) + 1).encode()),
        "block-length-short": word(block, 1, str(int(ops[block].line.split(b" ")[1]) - 1).encode()),
        "block-packing-raw": word(block, 3, b"raw"),
        "block-raw-as-zstd": word(raw_block, 3, b"zstd"),
        "block-over-1M": word(block, 1, b"1048577"),
        "block-stored-over-length": word(block, 2, b"9000"),
        "block-keyword": [*ops[:block], Op(b"copy" + ops[block].line[5:]), *ops[block + 1 :]],
        "block-swapped": [*ops[:block], ops[raw_block], ops[block], *ops[raw_block + 1 :]],
        "bspatch-block-sha": word(last, 4, sha(b"b").encode()),
    }.items():
        yield f"delta2-sq-{name}", signed(new_ops)
    for label, index in (("patch", raw_block), ("bspatch", last)):
        payload = ops[index].payload
        header = ops[index - (2 if label == "patch" else 1)]
        for name, changed_payload in {
            "flipped": payload[:40] + bytes([payload[40] ^ 0x55]) + payload[41:],
            "cut": payload[: len(payload) // 2],
            **(lz_payload_cases(payload) if payload.startswith(b"BSDIFFLZ") else {}),
        }.items():
            words = header.line.split(b" ")
            words[7] = str(len(changed_payload)).encode()
            changed = list(ops)
            changed[ops.index(header)] = Op(b" ".join(words))
            changed[index] = Op(ops[index].line, changed_payload)
            yield f"delta2-sq-{label}-payload-{name}", signed(changed)
