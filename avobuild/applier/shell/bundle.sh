# --- avocado-update: reading and checking bundles (applier/shell/bundle.sh) -------------------
# docs/bundle-format.md sections 2-6, read as strictly as avobuild's Python reader: the same
# bundle gets the same verdict from both (tests/test_differential.py).
refuse() { set_state_failed "$*"; die 3 "refused: $*"; }
incompatible() { set_state_failed "$*"; die 4 "refused: $*"; }
set_state_failed() {
    if [ "${FLEET_REFUSE:-0}" = 1 ]; then
        fleet_failed "$*"
    elif [ "${NO_STATE:-0}" != 1 ]; then
        set_state Failed "reason=$*"
    fi
}

# sig_check ALGORITHM PUBLIC-KEY MANIFEST SIGNATURE: one openssl command per algorithm
# (docs/signing.md, "Verifying with openssl"). Trusted keys are stored as KEY-ID.ALGORITHM.pem.
sig_check() {
    case $1 in
    ed25519) openssl pkeyutl -verify -pubin -inkey "$2" -rawin -in "$3" -sigfile "$4" ;;
    ecdsa-p256-sha256) openssl dgst -sha256 -verify "$2" -signature "$4" "$3" ;;
    ecdsa-p384-sha384) openssl dgst -sha384 -verify "$2" -signature "$4" "$3" ;;
    rsa-pss-sha256)
        openssl dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:32 \
            -sigopt rsa_mgf1_md:sha256 -verify "$2" -signature "$4" "$3" ;;
    *) return 1 ;;
    esac > /dev/null 2>&1
}

# The whole signature block in one awk pass (section 4 and its limits): every line's syntax,
# canonical base64, signature sizes and DER, duplicate key-ids and certificates. The limits
# come first on every line and the pass stops at the first violation, so an adversarial block
# costs at most MAX_SIGNATURE_LINES line checks. Prints "ALGORITHM KEY-ID BASE64" for every
# signature of a supported algorithm; on a violation, the reason as its last line, status 1.
# shellcheck disable=SC2016  # an awk program
SIGNATURE_BLOCK_AWK='
BEGIN {
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    quad = "[A-Za-z0-9+/][A-Za-z0-9+/][A-Za-z0-9+/][A-Za-z0-9+/]"
    canonical = "^(" quad ")*([A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/][A-Za-z0-9+/][AEIMQUYcgkosw048]=)?$"
    power[0] = 1  # powers of two: busybox awk may be built without its math library
    for (i = 1; i <= 16; i++) power[i] = power[i - 1] * 2
    # The order n of each curve and n/2 (SEC 2), in lowercase hex: r and s must lie in
    # [1, n), and s in [1, n/2], the one spelling of the signature (low s).
    order["ecdsa-p256-sha256"] = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551"
    half["ecdsa-p256-sha256"] = "7fffffff800000007fffffffffffffffde737d56d38bcf4279dce5617e3192a8"
    order["ecdsa-p384-sha384"] = "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973"
    half["ecdsa-p384-sha384"] = "7fffffffffffffffffffffffffffffffffffffffffffffffe3b1a6c0fa1b96efac0d06d9245853bd76760cb5666294b9"
    hexdigit = "0123456789abcdef"
}
function fail(why) { print "line " NR ": " why; failed = 1; exit 1 }
function check_base64(text, what) {
    if (text == "" || text !~ canonical) fail(what ": expected canonical base64 (RFC 4648, with padding)")
}
function decoded_size(text) {
    return length(text) / 4 * 3 - (text ~ /==$/ ? 2 : (text ~ /=$/ ? 1 : 0))
}
function decode(text,   i, value, bits, count) {
    count = 0; value = 0; bits = 0
    for (i = 1; i <= length(text); i++) {
        if (substr(text, i, 1) == "=") break
        value = value * 64 + index(alphabet, substr(text, i, 1)) - 1; bits += 6
        if (bits >= 8) { bits -= 8; byte[++count] = int(value / power[bits]); value = value % power[bits] }
    }
    return count
}
# A minimal positive DER INTEGER at position at; returns the position after it, or 0, and
# its value in hex (no leading zeros) as integer_hex.
function der_integer(at, count,   size, i) {
    if (at + 1 > count || byte[at] != 2) return 0
    size = byte[at + 1]
    if (size < 1 || size > 127 || at + 1 + size > count) return 0
    if (byte[at + 2] >= 128) return 0
    if (size > 1 && byte[at + 2] == 0 && byte[at + 3] < 128) return 0
    integer_hex = ""
    for (i = at + 2; i < at + 2 + size; i++)
        integer_hex = integer_hex substr(hexdigit, int(byte[i] / 16) + 1, 1) substr(hexdigit, byte[i] % 16 + 1, 1)
    sub(/^0+/, "", integer_hex)
    return at + 2 + size
}
# Compare two hex numbers without leading zeros: -1, 0 or 1.
function compare_hex(a, b) {
    if (length(a) != length(b)) return length(a) < length(b) ? -1 : 1
    return a < b ? -1 : (a > b ? 1 : 0)
}
function check_ecdsa(text, largest, algorithm,   count, at, r) {
    count = decode(text)
    if (count > largest || count < 2 || byte[1] != 48 || byte[2] > 127 || byte[2] != count - 2) at = 0
    else at = der_integer(3, count)
    r = integer_hex
    if (at) at = der_integer(at, count)
    if (at != count + 1) fail("an " algorithm " signature must be a DER ECDSA-Sig-Value")
    if (r == "" || compare_hex(r, order[algorithm]) >= 0 || integer_hex == "")
        fail("an " algorithm " signature needs 1 <= r, s < n")
    if (compare_hex(integer_hex, half[algorithm]) > 0)
        fail("an " algorithm " signature must use the low s (s <= n/2)")
}
NR > max_lines + 1 { fail("more than " max_lines " lines after the first") }
length($0) >= max_line { fail("longer than " max_line " bytes") }
NR == 1 {
    if ($0 != "avobuild-signatures 1") fail("expected avobuild-signatures 1")
    next
}
$0 == "" { fail("empty line") }
$0 !~ /^[a-z][a-z0-9-]*( [!-~]+)*$/ || length($1) > 32 {
    fail("expected a keyword and fields separated by single spaces")
}
$1 == "signature" {
    if (NF != 4) fail("signature: expected 3 values")
    if (++signatures > max_signatures) fail("more than " max_signatures " signatures")
    if ($2 !~ /^[a-z0-9][a-z0-9-]*$/ || length($2) > 64) fail("signature: bad algorithm name")
    if ($3 !~ /^[0-9a-f]+$/ || length($3) != 64) fail("signature: bad key-id")
    check_base64($4, "signature")
    if ($3 in signer) fail("a second signature by key " $3)
    signer[$3] = 1
    if ($2 == "ed25519" && decoded_size($4) != 64) fail("an ed25519 signature is 64 bytes")
    if ($2 == "ecdsa-p256-sha256") check_ecdsa($4, 72, $2)
    if ($2 == "ecdsa-p384-sha384") check_ecdsa($4, 104, $2)
    if ($2 == "ed25519" || $2 == "ecdsa-p256-sha256" || $2 == "ecdsa-p384-sha384" || $2 == "rsa-pss-sha256")
        print $2, $3, $4
    next
}
$1 == "certificate" {
    if (NF != 3) fail("certificate: expected 2 values")
    if ($2 !~ /^[0-9a-f]+$/ || length($2) != 64) fail("certificate: bad key-id")
    check_base64($3, "certificate")
    if (decoded_size($3) > max_certificate_size) fail("certificate: over " max_certificate_size " bytes")
    if ($3 in certificate) fail("the same certificate twice")
    certificate[$3] = 1
    if (++certificates > max_certificates) fail("more than " max_certificates " certificates")
}
$1 == "recipient" && ++recipients > max_recipients { fail("more than " max_recipients " recipients") }
'

verify_signatures() {
    sigs=$WORK/signatures
    [ "$(LC_ALL=C tr -d '\n -~' < "$sigs" | wc -c)" -eq 0 ] \
        || refuse "$bundle_name: signature block: byte outside printable ASCII"
    [ "$(tail -c 1 "$sigs" | od -An -tx1 | tr -d ' ')" = 0a ] \
        || refuse "$bundle_name: signature block: not terminated by a newline"
    LC_ALL=C awk -v max_lines="$MAX_SIGNATURE_LINES" -v max_line="$MAX_SIGNATURE_LINE" \
        -v max_signatures="$MAX_SIGNATURES" -v max_certificates="$MAX_CERTIFICATES" \
        -v max_recipients="$MAX_RECIPIENTS" \
        -v max_certificate_size="$MAX_CERTIFICATE_SIZE" "$SIGNATURE_BLOCK_AWK" "$sigs" \
        > "$WORK/signers" || refuse "$bundle_name: signature block $(tail -n 1 "$WORK/signers")"
    verified=0
    untrusted=
    while read -r algorithm key_id encoded; do
        key=$KEYS_DIR/$key_id.$algorithm.pem
        if [ ! -f "$key" ]; then
            # A trusted key with another algorithm than its own: a signature that cannot verify.
            set -- "$KEYS_DIR/$key_id".*.pem
            [ ! -f "$1" ] || refuse "$bundle_name: signature by trusted key $key_id does not verify ($algorithm is not its algorithm)"
            untrusted="$untrusted $key_id"
            continue
        fi
        printf '%s' "$encoded" | base64 -d > "$WORK/signature.bin" 2> /dev/null \
            || refuse "$bundle_name: signature by $key_id: not base64"
        sig_check "$algorithm" "$key" "$WORK/manifest" "$WORK/signature.bin" \
            || refuse "$bundle_name: signature by trusted key $key_id does not verify (tampered manifest?)"
        verified=$((verified + 1))
    done < "$WORK/signers"
    [ "$verified" -ge 1 ] \
        || refuse "$bundle_name: bundle signed by key(s)${untrusted:- (none)}, none of them trusted in $KEYS_DIR"
    [ "$verified" -ge "$SIGNATURE_THRESHOLD" ] \
        || refuse "$bundle_name: $verified trusted signature(s) verified, $SIGNATURE_THRESHOLD needed"
}

# Strict manifest check (section 3) after the signature verified; plans the target partitions.
parse_manifest() {
    manifest=$WORK/manifest
    [ "$(LC_ALL=C tr -d '\n -~' < "$manifest" | wc -c)" -eq 0 ] \
        || refuse "$bundle_name: manifest: byte outside printable ASCII"
    [ "$(tail -c 1 "$manifest" | od -An -tx1 | tr -d ' ')" = 0a ] \
        || refuse "$bundle_name: manifest: not terminated by a newline"
    ! grep -q -e '^$' -e '^ ' -e ' $' -e '  ' "$manifest" \
        || refuse "$bundle_name: manifest: empty line or misplaced spaces"
    exec 3< "$manifest"
    expect() {
        read -r keyword value rest <&3 || refuse "$bundle_name: manifest ends before '$1'"
        [ "$keyword" = "$1" ] && [ -n "$value" ] && [ -z "$rest" ] \
            || refuse "$bundle_name: manifest: expected '$1' and one value, got '$keyword'"
    }
    expect avobuild-manifest
    manifest_version=$value
    case $manifest_version in
    1 | 2 | 3) ;;
    *) refuse "$bundle_name: unsupported manifest version '$value' (this applier reads versions 1 to 3)" ;;
    esac
    expect type
    case $value in
    full | delta) bundle_type=$value ;;
    *) refuse "$bundle_name: manifest: unknown bundle type '$value'" ;;
    esac
    expect name
    is_name identifier "$value" || refuse "$bundle_name: manifest: bad name"
    bundle_product=$value
    expect version
    is_name identifier "$value" || refuse "$bundle_name: manifest: bad version"
    bundle_version=$value
    expect compatible
    bundle_compatible=$value
    v2_features=0
    if ! is_name identifier "$value"; then
        [ "$manifest_version" != 1 ] && is_name compatible_glob "$value" \
            || refuse "$bundle_name: manifest: bad compatible"
        v2_features=1
    fi
    expect build-date
    is_number "$value" || refuse "$bundle_name: manifest: bad build-date"
    # Version 2 policy lines (bundle-format.md 3.5), each optional, in this order.
    bundle_security_version=0 min_applier='' expires=''
    read -r keyword value rest <&3 || refuse "$bundle_name: manifest ends before 'chunk-size'"
    for optional in security-version min-applier-version expires; do
        [ "$keyword" = "$optional" ] || continue
        [ "$manifest_version" != 1 ] && [ -n "$value" ] && [ -z "$rest" ] \
            || refuse "$bundle_name: manifest: '$keyword' needs manifest version 2 and one value"
        case $keyword in
        security-version)
            is_number "$value" || refuse "$bundle_name: manifest: bad security-version"
            bundle_security_version=$value ;;
        min-applier-version)
            printf '%s\n' "$value" | grep -qx '\(0\|[1-9][0-9]\{0,8\}\)\(\.\(0\|[1-9][0-9]\{0,8\}\)\)\{0,3\}' \
                || refuse "$bundle_name: manifest: bad min-applier-version"
            min_applier=$value ;;
        expires)
            is_number "$value" || refuse "$bundle_name: manifest: bad expires"
            expires=$value ;;
        esac
        v2_features=1
        read -r keyword value rest <&3 || refuse "$bundle_name: manifest ends before 'chunk-size'"
    done
    [ "$keyword" = chunk-size ] && [ -z "$rest" ] \
        || refuse "$bundle_name: manifest: expected 'chunk-size', got '$keyword'"
    chunk_size=$value
    is_number "$chunk_size" 16777216 || refuse "$bundle_name: manifest: bad chunk-size"
    power=65536
    while [ "$power" -lt 16777216 ] && [ "$power" -lt "$chunk_size" ]; do power=$((power * 2)); done
    [ "$power" = "$chunk_size" ] \
        || refuse "$bundle_name: manifest: chunk-size '$chunk_size' is not a power of two from 64K to 16M"
    # compression zstd | none | zstd-stream FRAME-CHUNKS WINDOW-LOG (version 3, section 5.2)
    read -r keyword compression frame_chunks window_log rest <&3 \
        || refuse "$bundle_name: manifest ends before 'compression'"
    [ "$keyword" = compression ] && [ -n "$compression" ] && [ -z "$rest" ] \
        || refuse "$bundle_name: manifest: expected 'compression', got '$keyword'"
    case $compression in
    zstd | none)
        [ -z "$frame_chunks" ] || refuse "$bundle_name: manifest: compression: expected one value" ;;
    zstd-stream)
        [ "$manifest_version" = 3 ] \
            || refuse "$bundle_name: manifest: compression zstd-stream needs manifest version 3"
        is_number "$frame_chunks" 65536 && [ "$frame_chunks" -ge 1 ] \
            && is_number "$window_log" 27 && [ "$window_log" -ge 10 ] \
            || refuse "$bundle_name: manifest: compression zstd-stream: bad frame-chunks or window-log" ;;
    *) refuse "$bundle_name: manifest: compression '$compression'" ;;
    esac
    ! grep -q '^encryption ' "$manifest" || v2_features=1   # refused below, at its line
    [ "$manifest_version" != 2 ] || [ "$v2_features" = 1 ] \
        || refuse "$bundle_name: manifest version 2 without any version 2 feature"
    [ "$manifest_version" != 3 ] || [ "$compression" = zstd-stream ] \
        || refuse "$bundle_name: manifest version 3 without compression zstd-stream"
    check_policy

    : > "$WORK/plan"
    image='' left=0 images=0 need=''
    while read -r keyword a b c d e rest <&3; do
        [ -z "$rest" ] && { [ -z "$e" ] || [ "$keyword$compression" = chunkzstd-stream ]; } \
            || refuse "$bundle_name: manifest: too many fields on a $keyword line"
        case $keyword in
        image)
            [ "$left" -eq 0 ] || refuse "$bundle_name: manifest: image $image lacks chunks"
            [ -z "$need" ] || refuse "$bundle_name: manifest: image $image lacks its $need line"
            is_name image_name "$a" && is_number "$b" && is_sha256 "$c" && is_number "$d" \
                || refuse "$bundle_name: manifest: malformed image line"
            ! grep -q "^$a " "$WORK/plan" || refuse "$bundle_name: manifest: image $a listed twice"
            [ "$d" -eq $((b / chunk_size + (b % chunk_size > 0))) ] \
                || refuse "$bundle_name: manifest: image $a: wrong chunk count"
            [ "$b" != 0 ] || [ "$c" = e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 ] \
                || refuse "$bundle_name: manifest: image $a: an empty image has the empty sha256"
            slot_device "$a" "$target" \
                || incompatible "$bundle_name: bundle image '$a' has no slot on this device"
            image=$a size=$b image_sha=$c count=$d left=$d index=0 images=$((images + 1))
            target_ref="$part_dev $part_base $part_size $part_label"
            if [ "$bundle_type" = full ]; then
                [ "$b" -le "$part_size" ] \
                    || incompatible "$bundle_name: bundle image '$a' is $b bytes, larger than partition $part_label ($part_size bytes)"
                echo "$a $b $c $d $target_ref $b $c - - - - -" >> "$WORK/plan"
                need=''
            else
                need=source
            fi
            ;;
        source)
            [ "$need" = source ] && is_number "$a" && is_sha256 "$b" && [ -z "$c" ] \
                || refuse "$bundle_name: manifest: misplaced or malformed source line"
            slot_device "$image" "$(other_slot "$target")" \
                || incompatible "$bundle_name: bundle image '$image' has no source slot on this device"
            [ "$a" -le "$part_size" ] || incompatible "$bundle_name: delta source of '$image' is larger than $part_label"
            source_ref="$part_dev $part_base $part_size $a $b"
            need=target ;;
        target)
            [ "$need" = target ] && is_number "$a" && is_sha256 "$b" && [ -z "$c" ] \
                || refuse "$bundle_name: manifest: misplaced or malformed target line"
            # shellcheck disable=SC2086  # the fields of target_ref
            set -- $target_ref
            [ "$a" -le "$3" ] \
                || incompatible "$bundle_name: delta target of '$image' is $a bytes, larger than partition $4 ($3 bytes)"
            echo "$image $size $image_sha $count $target_ref $a $b $source_ref" >> "$WORK/plan"
            need='' ;;
        chunk)
            [ -z "$need" ] || refuse "$bundle_name: manifest: image $image lacks its $need line"
            [ "$a" = "$image" ] && [ "$b" = "$index" ] && [ "$left" -gt 0 ] \
                || refuse "$bundle_name: manifest: unexpected chunk line"
            is_number "$c" && is_sha256 "$d" || refuse "$bundle_name: manifest: malformed chunk line"
            [ "$compression" != zstd-stream ] || is_sha256 "$e" \
                || refuse "$bundle_name: manifest: chunk $index of image $image lacks its data sha256"
            data_size=$((size - index * chunk_size))
            [ "$data_size" -le "$chunk_size" ] || data_size=$chunk_size
            if [ "$compression" = none ]; then limit=$data_size; else limit=$((data_size + data_size / 128 + 512)); fi
            [ "$c" -ge 1 ] && [ "$c" -le "$limit" ] && { [ "$compression" != none ] || [ "$c" -eq "$data_size" ]; } \
                || refuse "$bundle_name: manifest: chunk $index of image $image: stored-size $c out of bounds"
            left=$((left - 1)) index=$((index + 1))
            ;;
        encryption)
            [ "$images" -eq 0 ] && [ "$manifest_version" != 1 ] || refuse "$bundle_name: manifest: misplaced encryption line"
            refuse "$bundle_name: encrypted bundles are not supported by this applier yet" ;;
        *) refuse "$bundle_name: manifest: unknown line '$keyword' (not part of manifest version $manifest_version)" ;;
        esac
    done
    exec 3<&-
    [ -z "$need" ] || refuse "$bundle_name: manifest: image $image lacks its $need line"
    [ "$left" -eq 0 ] || refuse "$bundle_name: manifest: image $image lacks chunks"
    [ "$images" -ge 1 ] || refuse "$bundle_name: manifest lists no image"
}

# Installation policy of the signed manifest (bundle-format.md 3.5), before any write.
check_policy() {
    # shellcheck disable=SC2254  # version 1: an exact string; version 2: a glob with * and ?
    case $avo_compatible in
    $bundle_compatible) ;;
    *) incompatible "$bundle_name: bundle is for '$bundle_compatible' but this device is '$avo_compatible'; nothing was written" ;;
    esac
    floor=${avo_security_version:-0}
    [ "$bundle_security_version" -ge "$floor" ] \
        || incompatible "$bundle_name: security-version $bundle_security_version is below this device's floor $floor (anti-rollback)"
    if [ -n "$min_applier" ] && ! version_at_least "$APPLIER_VERSION" "$min_applier"; then
        incompatible "$bundle_name: bundle $bundle_version needs applier version $min_applier, this is $APPLIER_VERSION"
    fi
    if [ -n "$expires" ] && [ "$(date +%s)" -gt "$expires" ]; then
        incompatible "$bundle_name: bundle $bundle_version expired at $expires (seconds since 1970)"
    fi
}

# A delta applies only to the exact source image: hash it before anything is written
# (docs/delta-format.md section 4, step 2).
check_delta_sources() {
    while read -r name _ _ _ _ _ _ _ _ _ src_dev src_base src_part src_size src_sha; do
        [ "$src_dev" != - ] || continue
        got=$(slot_read "$src_dev" "$src_base" "$src_part" 0 "$src_size" | sha256sum | cut -d' ' -f1)
        [ "$got" = "$src_sha" ] \
            || incompatible "$bundle_name: delta for image $name needs a source the running slot does not hold; nothing was written"
    done < "$WORK/plan"
}

# version_at_least HAVE NEED: dotted numbers compared field by field (1.10 > 1.9).
version_at_least() {
    awk -v have="$1" -v need="$2" 'BEGIN {
        n = split(have, h, "."); m = split(need, w, "."); if (m > n) n = m
        for (i = 1; i <= n; i++) { if (h[i] + 0 > w[i] + 0) exit 0; if (h[i] + 0 < w[i] + 0) exit 1 }
        exit 0 }'
}

# one_zstd_frame FILE SIZE: FILE is exactly one zstd frame (no skippable frame, no dictionary,
# nothing after it) whose header declares SIZE bytes of content (bundle-format.md section 5),
# as `zstd -lv` (zstd 1.4 and later) describes it: one process, the rest is pattern matching.
NL='
'
one_zstd_frame() {
    _zf_info=$NL$(zstd -lv -- "$1" 2> /dev/null)$NL || return 1
    case $_zf_info in *"$NL# Skippable Frames:"*) return 1 ;; esac
    case $_zf_info in *"$NL# Zstandard Frames: 1$NL"*) ;; *) return 1 ;; esac
    case $_zf_info in *"${NL}DictID: 0$NL"*) ;; *) return 1 ;; esac
    _zf_line=${_zf_info#*"${NL}Decompressed Size: "}
    [ "$_zf_line" != "$_zf_info" ] || return 1
    case ${_zf_line%%"$NL"*} in *"($2 B)") ;; *) return 1 ;; esac
}

# read_bundle MODE < BUNDLE, MODE verify (writes nothing) or write (to the target slot).
read_bundle() {
    mode=$1
    take 34 > "$WORK/header"
    got=$(size_of "$WORK/header")
    [ "$got" -eq 34 ] || refuse "$bundle_name: truncated at byte offset $got: the header is 34 bytes"
    [ "$(dd if="$WORK/header" bs=10 count=1 2> /dev/null)" = "AVOBUNDLE " ] \
        || refuse "$bundle_name: not an avobuild bundle"
    [ "$(dd if="$WORK/header" bs=1 skip=10 count=1 2> /dev/null)" = 1 ] \
        || refuse "$bundle_name: unsupported format version"
    grep -qx 'AVOBUNDLE 1 [0-9]\{10\} [0-9]\{10\}' "$WORK/header" \
        || refuse "$bundle_name: malformed header"
    read -r _ _ manifest_size signature_size < "$WORK/header"
    # Ten zero-padded digits: the zeros go before the number is parsed (never $(( )) on them).
    manifest_size=${manifest_size#"${manifest_size%%[!0]*}"}
    signature_size=${signature_size#"${signature_size%%[!0]*}"}
    is_number "${manifest_size:-0}" "$MAX_MANIFEST_SIZE" && [ "${manifest_size:-0}" -ge 1 ] \
        || refuse "$bundle_name: manifest size ${manifest_size:-0} out of bounds (1 to $MAX_MANIFEST_SIZE)"
    is_number "${signature_size:-0}" "$MAX_SIGNATURE_BLOCK_SIZE" && [ "${signature_size:-0}" -ge 1 ] \
        || refuse "$bundle_name: signature block size ${signature_size:-0} out of bounds (1 to $MAX_SIGNATURE_BLOCK_SIZE)"
    take "$manifest_size" > "$WORK/manifest"
    got=$(size_of "$WORK/manifest")
    [ "$got" -eq "$manifest_size" ] || refuse "$bundle_name: truncated at byte offset $((34 + got)) in the manifest"
    take "$signature_size" > "$WORK/signatures"
    got=$(size_of "$WORK/signatures")
    [ "$got" -eq "$signature_size" ] \
        || refuse "$bundle_name: truncated at byte offset $((34 + manifest_size + got)) in the signature block"
    verify_signatures
    manifest_sha=$(sha_of "$WORK/manifest")
    if [ -n "${expected_manifest:-}" ] && [ "$manifest_sha" != "$expected_manifest" ]; then
        refuse "$bundle_name: changed while it was being installed"
    fi
    parse_manifest
    check_delta_sources
    offset=$((34 + manifest_size + signature_size))
    : > "$WORK/resume.done"
    if [ "$mode" = write ]; then
        [ "$bundle_type" != full ] || resume_load
        invalidate_target
        [ "$bundle_type" != full ] || [ "$compression" != zstd-stream ] || resume_check_slot
    fi
    exec 3< "$WORK/manifest"
    image=''
    while read -r keyword a b c d _ <&3; do
        case $keyword in
        image)
            image=$a size=$b image_sha=$c left=$d count=$d
            # shellcheck disable=SC2046  # the fields of the image's plan line
            set -- $(grep "^$a " "$WORK/plan")
            dev=$5 base=$6 slot_size=$7 target_size=${9} target_sha=${10}
            src_dev=${11} src_base=${12} src_part=${13} src_size=${14} src_sha=${15}
            skip=$(sed -n "s/^$a //p" "$WORK/resume.done")
            skip=${skip:-0}
            [ "$skip" = 0 ] \
                || log "resuming image $a at chunk $skip of $count (the chunks before it, already in slot $target, were checked)"
            start_image
            ;;
        chunk)
            take "$c" > "$WORK/chunk"
            got=$(size_of "$WORK/chunk")
            [ "$got" -eq "$c" ] \
                || refuse "$bundle_name: truncated at byte offset $((offset + got)): expected $((c - got)) more bytes of chunk $b of image $image"
            [ "$(sha_of "$WORK/chunk")" = "$d" ] \
                || refuse "$bundle_name: chunk $b of image $image at byte offset $offset: sha256 mismatch"
            data_size=$((size - b * chunk_size))
            [ "$data_size" -le "$chunk_size" ] || data_size=$chunk_size
            if [ "$compression" = zstd-stream ]; then
                # A resumed frame: its stored bytes are checked above, its data in the slot.
                [ "$b" -lt "$skip" ] || stream_chunk "$b"
                offset=$((offset + c))
                left=$((left - 1))
                [ "$left" -ne 0 ] || { finish_image; image=''; }
                continue
            fi
            if [ "$compression" = zstd ]; then
                one_zstd_frame "$WORK/chunk" "$data_size" \
                    || refuse "$bundle_name: chunk $b of image $image is not one zstd frame of $data_size bytes"
                # Capped one byte past the expected size: a frame that holds more is refused.
                zstd -q -d -c < "$WORK/chunk" 2> /dev/null | take $((data_size + 1)) > "$WORK/data"
            else
                mv "$WORK/chunk" "$WORK/data"
            fi
            [ "$(size_of "$WORK/data")" -eq "$data_size" ] \
                || refuse "$bundle_name: chunk $b of image $image does not decompress to $data_size bytes"
            use_chunk_data "$b" "$data_size" "$WORK/data" \
                || die 1 "$dev: write failed at byte offset $((base + b * chunk_size))"
            [ $(((b + 1) % RESUME_INTERVAL)) != 0 ] && [ "$left" != 1 ] || resume_save "$b"
            offset=$((offset + c))
            left=$((left - 1))
            ;;
        *) ;;  # the header lines, checked by parse_manifest
        esac
        [ -z "$image" ] || [ "$left" -ne 0 ] || { finish_image; image=''; }
    done
    exec 3<&-
    [ "$(take 1 | wc -c | tr -d ' ')" -eq 0 ] || refuse "$bundle_name: trailing data after the payload"
}

# use_chunk_data INDEX SIZE FILE: a checked chunk's data, written to the slot (write mode, full
# bundle), or handed to the image hasher (fd 5) and the delta applier (fd 6).
use_chunk_data() {
    if [ "$mode" = write ] && [ "$bundle_type" = full ]; then
        # Resuming version 1 chunks (no data hash per chunk): a chunk the slot already holds,
        # compared byte for byte, is not written again.
        if [ "$1" -lt "${skip:-0}" ] \
            && slot_read "$dev" "$base" "$slot_size" $(($1 * chunk_size)) "$2" | cmp -s - "$3"; then
            return 0
        fi
        slot_write "$dev" "$base" "$slot_size" $(($1 * chunk_size)) "$2" < "$3" || return 1
        checkpoint "$2"
    else
        cat "$3" >&5
        # A delta applier that stopped reports why in finish_image.
        [ "$bundle_type" = full ] || cat "$3" >&6 2> /dev/null || true
    fi
}

# --- zstd-stream payloads (bundle-format.md 5.2) ---------------------------------------------
# One `zstd -d` process per frame reads, through a FIFO on fd 7, only chunks whose stored bytes
# matched their sha256; a background reader (decode_frame) takes each chunk's data from its
# output, checks the data's own sha256 and only then uses it. Neither side waits for the
# other (no lockstep with zstd's buffering), and the temporary space is one chunk.

# stream_frame_header FILE SIZE WINDOW-LOG: FILE starts a zstd frame header (RFC 8878 3.1.1.1)
# declaring SIZE bytes of content, no dictionary, a window of at most 2^WINDOW-LOG bytes.
stream_frame_header() {
    _sf_want=$2 _sf_log=$3
    # shellcheck disable=SC2046  # the bytes as fields
    set -- $(od -An -tu1 -N18 -v "$1")
    [ $# -ge 6 ] && [ "$1 $2 $3 $4" = "40 181 47 253" ] || return 1
    _sf_d=$5
    shift 5
    [ $((_sf_d & 8)) -eq 0 ] && [ $((_sf_d & 3)) -eq 0 ] || return 1
    _sf_single=$(((_sf_d >> 5) & 1))
    _sf_window=0
    if [ "$_sf_single" = 0 ]; then
        _sf_base=$((1 << (10 + ($1 >> 3))))
        _sf_window=$((_sf_base + (_sf_base >> 3) * ($1 & 7)))
        shift
    fi
    case $((_sf_d >> 6)) in 0) _sf_n=$_sf_single ;; 1) _sf_n=2 ;; 2) _sf_n=4 ;; *) _sf_n=8 ;; esac
    [ "$_sf_n" -gt 0 ] && [ $# -ge "$_sf_n" ] || return 1
    _sf_size=0 _sf_i=0
    while [ "$_sf_i" -lt "$_sf_n" ]; do
        _sf_size=$((_sf_size + ($1 << (8 * _sf_i))))
        _sf_i=$((_sf_i + 1))
        shift
    done
    [ "$_sf_n" != 2 ] || _sf_size=$((_sf_size + 256))
    [ "$_sf_single" = 0 ] || _sf_window=$_sf_size
    [ "$_sf_size" = "$_sf_want" ] && [ "$_sf_window" -le $((1 << _sf_log)) ] || return 1
    # Where the frame walk starts (frame_walk): the header's own length, the checksum flag.
    _fw_skip=$((5 + 1 - _sf_single + _sf_n)) _fw_checksum=$(((_sf_d >> 2) & 1))
    _fw_head='' _fw_last=0 _fw_ended=0
}

# frame_walk FILE: the next stored bytes of the current frame, walked block header by block
# header (RFC 8878 3.1.1.2) without decoding, as the Python reader's _FrameEnd does: status 1
# when FILE holds a byte after the frame's end (a skippable frame, which the zstd command would
# skip silently, a second frame, garbage); _fw_ended=1 once the frame ended. One `od` per
# block (a block holds at most 128 KiB of data). A block header may straddle two chunks.
frame_walk() {
    _fw_file=$1
    _fw_size=$(size_of "$_fw_file") _fw_at=0
    while :; do
        if [ "$_fw_skip" -gt 0 ]; then
            if [ "$_fw_skip" -ge $((_fw_size - _fw_at)) ]; then
                _fw_skip=$((_fw_skip - (_fw_size - _fw_at))) _fw_at=$_fw_size
            else
                _fw_at=$((_fw_at + _fw_skip)) _fw_skip=0
            fi
            [ "$_fw_skip" -gt 0 ] || [ "$_fw_last" = 0 ] || _fw_ended=1
        fi
        [ "$_fw_at" -lt "$_fw_size" ] || return 0
        [ "$_fw_ended" = 0 ] || return 1
        # shellcheck disable=SC2086  # the header bytes read so far, as fields
        set -- $_fw_head
        _fw_need=$((3 - $#))
        # shellcheck disable=SC2046  # the bytes as fields
        set -- "$@" $(od -An -tu1 -v -j "$_fw_at" -N "$_fw_need" "$_fw_file")
        _fw_at=$((_fw_at + _fw_need))
        if [ $# -lt 3 ]; then
            _fw_head=$*
            continue
        fi
        _fw_head=''
        _fw_h=$(($1 + ($2 << 8) + ($3 << 16)))
        _fw_last=$((_fw_h & 1))
        case $(((_fw_h >> 1) & 3)) in
        1) _fw_skip=1 ;;
        3) return 1 ;;
        *) _fw_skip=$((_fw_h >> 3)) ;;
        esac
        [ "$_fw_last" = 0 ] || _fw_skip=$((_fw_skip + 4 * _fw_checksum))
        [ "$_fw_skip" -gt 0 ] || [ "$_fw_last" = 0 ] || _fw_ended=1
    done
}

# stream_chunk INDEX: the checked stored bytes of chunk INDEX ($WORK/chunk) into its frame's
# decoder; the first chunk of a frame starts the decoder, the last one waits for its verdict.
stream_chunk() {
    _sc_first=$(($1 / frame_chunks * frame_chunks))
    _sc_last=$((_sc_first + frame_chunks - 1))
    [ "$_sc_last" -lt "$count" ] || _sc_last=$((count - 1))
    if [ "$1" = "$_sc_first" ]; then
        _sc_size=$((size - _sc_first * chunk_size))
        [ "$_sc_size" -le $(((_sc_last - _sc_first + 1) * chunk_size)) ] \
            || _sc_size=$(((_sc_last - _sc_first + 1) * chunk_size))
        stream_frame_header "$WORK/chunk" "$_sc_size" "$window_log" \
            || refuse "$bundle_name: chunk $1 of image $image does not start a zstd frame of $_sc_size bytes with a window of at most 2^$window_log"
        awk -v image="$image" -v first="$_sc_first" -v last="$_sc_last" \
            '$1 == "chunk" && $2 == image && $3 >= first && $3 <= last { print $3, $6 }' \
            "$WORK/manifest" > "$WORK/frame.list"
        rm -f "$WORK/frame.fifo" "$WORK/frame.status" "$WORK/zstd.status"
        mkfifo "$WORK/frame.fifo"
        { zstd -q -d -c --memory=$((1 << window_log)) < "$WORK/frame.fifo" 2> /dev/null
            echo $? > "$WORK/zstd.status"; } | decode_frame &
        frame_pid=$!
        exec 7> "$WORK/frame.fifo"
    fi
    # The frame must end exactly with its last chunk (5.2). A write pass of a file the verify
    # pass walked (same signed manifest, same stored hashes) need not walk it again.
    if [ "$mode" = verify ] || [ -z "${expected_manifest:-}" ]; then
        frame_walk "$WORK/chunk" \
            || refuse "$bundle_name: chunk $1 of image $image holds bytes after the end of its zstd frame"
        [ "$1" != "$_sc_last" ] || [ "$_fw_ended" = 1 ] \
            || refuse "$bundle_name: chunk $1 of image $image ends before its zstd frame does"
    fi
    # A subshell: if the decoder is gone, the write fails (SIGPIPE) without killing the applier.
    (cat "$WORK/chunk" >&7) 2> /dev/null || true
    [ "$1" = "$_sc_last" ] || return 0
    exec 7>&-
    wait "$frame_pid" || true
    _sc_status=$(cat "$WORK/frame.status" 2> /dev/null)
    [ "$_sc_status" = ok ] || refuse "$bundle_name: ${_sc_status:-chunk $1 of image $image: its frame cannot be decoded}"
    [ "$(cat "$WORK/zstd.status" 2> /dev/null)" = 0 ] \
        || refuse "$bundle_name: chunk $1 of image $image: zstd refused its frame"
    resume_save "$1"
}

# decode_frame < DECODED-FRAME (a background job): the data of each chunk of $WORK/frame.list,
# checked against its sha256, then used; the verdict goes to $WORK/frame.status. On an error
# it keeps reading, so that the decoder and the applier never block on a full pipe.
decode_frame() {
    _df_status=ok
    while read -r _df_index _df_sha <&4; do
        _df_size=$((size - _df_index * chunk_size))
        [ "$_df_size" -le "$chunk_size" ] || _df_size=$chunk_size
        take "$_df_size" > "$WORK/frame.data"
        if [ "$(size_of "$WORK/frame.data")" -ne "$_df_size" ]; then
            _df_status="chunk $_df_index of image $image does not decode to $_df_size bytes"
        elif [ "$(sha_of "$WORK/frame.data")" != "$_df_sha" ]; then
            _df_status="chunk $_df_index of image $image: sha256 of its decompressed data does not match"
        elif ! use_chunk_data "$_df_index" "$_df_size" "$WORK/frame.data"; then
            _df_status="chunk $_df_index of image $image: write failed at byte offset $((base + _df_index * chunk_size))"
        fi
        [ "$_df_status" = ok ] || break
    done 4< "$WORK/frame.list"
    if [ "$_df_status" = ok ] && [ "$(take 1 | wc -c)" -ne 0 ]; then
        _df_status="image $image: a frame decodes to more than its chunks"
    fi
    cat > /dev/null
    echo "$_df_status" > "$WORK/frame.status"
}

# Per image: a hasher of the image bytes (fd 5), and for a delta the delta applier (fd 6),
# which in verify mode writes nothing and hands the target it would write to a second hasher.
start_image() {
    [ "$mode" = verify ] || [ "$bundle_type" = delta ] || return 0
    rm -f "$WORK/hash.fifo" "$WORK/delta.fifo" "$WORK/target.fifo" "$WORK/delta.status"
    mkfifo "$WORK/hash.fifo"
    # Every reader starts before this shell opens a pipe, so that none of them inherits
    # another's write end (it would never see the end of its input).
    if [ "$bundle_type" = delta ]; then
        mkfifo "$WORK/delta.fifo"
        if [ "$mode" = verify ]; then
            mkfifo "$WORK/target.fifo"
            sha256sum < "$WORK/target.fifo" | cut -d' ' -f1 > "$WORK/target.out" &
            target_hasher=$!
            delta_mode=check
        else
            delta_mode='write'
        fi
        apply_delta "$delta_mode" "$size" < "$WORK/delta.fifo" &
        delta_pid=$!
    fi
    sha256sum < "$WORK/hash.fifo" | cut -d' ' -f1 > "$WORK/hash.out" &
    hasher=$!
    exec 5> "$WORK/hash.fifo"
    [ "$bundle_type" = full ] || exec 6> "$WORK/delta.fifo"
}

finish_image() {
    if [ "$mode" = verify ] || [ "$bundle_type" = delta ]; then
        exec 5>&-
        wait "$hasher"
        [ "$(cat "$WORK/hash.out")" = "$image_sha" ] \
            || refuse "$bundle_name: image $image: sha256 of the whole image does not match"
    fi
    if [ "$bundle_type" = delta ]; then
        exec 6>&-
        wait "$delta_pid"
        status=$(cat "$WORK/delta.status" 2> /dev/null)
        if [ "$mode" = verify ]; then
            wait "$target_hasher"
            [ "$status" = checked ] || refuse "$bundle_name: delta of image $image: ${status:-failed}; nothing was written"
            [ "$(cat "$WORK/target.out")" = "$target_sha" ] \
                || refuse "$bundle_name: delta of image $image does not produce its target (sha256 mismatch); nothing was written"
        else
            [ "$status" = applied ] \
                || die 1 "$bundle_name: delta of image $image: ${status:-failed}; the slot stays inactive"
        fi
    fi
    [ "$mode" = write ] || return 0
    sync
    got_sha=$(slot_read "$dev" "$base" "$slot_size" 0 "$target_size" | sha256sum | cut -d' ' -f1)
    if [ "$got_sha" != "$target_sha" ]; then
        rm -f "$RESUME_FILE"
        die 1 "$dev: image $image read back at byte offset $base does not match its hash; the slot stays inactive"
    fi
}

# --- resuming an interrupted full install (docs/applier.md, "Resuming an interrupted install")
# $STATE_DIR/resume, on the data partition, is written only after a frame's chunks (version 1:
# RESUME_INTERVAL chunks) were written, checked and synced. It is a hint: resume_load takes it
# only when it parses strictly, names this bundle's signed manifest, this target slot and each
# image's partition, stays within each image's chunks and stops at a frame's end, and the
# target slot was left unbootable since; resume_check_slot then reads every chunk it counts back
# from the slot against its signed data hash. Anything else starts over from chunk 0.
RESUME_FILE=$STATE_DIR/resume
RESUME_INTERVAL=16

resume_load() {
    : > "$WORK/resume.done"
    [ -e "$RESUME_FILE" ] || [ -L "$RESUME_FILE" ] || return 0
    _rl_why=$(resume_parse) && return 0
    log "$RESUME_FILE: resume record not used ($_rl_why); starting over"
    : > "$WORK/resume.done"
    # A record of another install must not outlive this one's first write.
    rm -f "$RESUME_FILE"
}

# resume_parse: the record's "NAME CHUNKS" lines into $WORK/resume.done; on a mismatch the
# reason on stdout, status 1. Nothing in it is used unchecked: every number is bounded.
resume_parse() {
    _rp_file=$RESUME_FILE
    [ -f "$_rp_file" ] && [ ! -L "$_rp_file" ] || { echo "not a regular file"; return 1; }
    [ "$(size_of "$_rp_file")" -le 65536 ] || { echo "larger than 65536 bytes"; return 1; }
    [ "$(LC_ALL=C tr -d '\n -~' < "$_rp_file" | wc -c)" -eq 0 ] \
        && [ "$(tail -c 1 "$_rp_file" | od -An -tx1 | tr -d ' ')" = 0a ] \
        || { echo "not lines of printable ASCII"; return 1; }
    [ "$(sed -n 1p "$_rp_file")" = "avobuild-resume 1" ] || { echo "line 1: expected avobuild-resume 1"; return 1; }
    [ "$(sed -n 2p "$_rp_file")" = "manifest $manifest_sha" ] || { echo "it records another bundle"; return 1; }
    [ "$(sed -n 3p "$_rp_file")" = "slot $target" ] || { echo "it records another slot than $target"; return 1; }
    [ "$(slot_var "$target" ok)" != 1 ] && [ -z "$(slot_var "$target" version)" ] \
        || { echo "slot $target holds a system since"; return 1; }
    [ "$(wc -l < "$_rp_file")" -eq $(($(wc -l < "$WORK/plan") + 3)) ] \
        || { echo "its images are not the bundle's"; return 1; }
    _rp_open=0
    sed 1,3d "$_rp_file" > "$WORK/resume.lines"
    while read -r _rp_name _ _ _rp_count _ _rp_base _ <&8 && read -r _rp_word _rp_rname _rp_rbase _rp_done _rp_rest; do
        [ "$_rp_word" = image ] && [ "$_rp_rname" = "$_rp_name" ] && [ "$_rp_rbase" = "$_rp_base" ] \
            && [ -z "$_rp_rest" ] || { echo "image $_rp_name: another image or partition"; return 1; }
        is_number "$_rp_done" "$_rp_count" || { echo "image $_rp_name: not 0 to $_rp_count chunks"; return 1; }
        if [ "$compression" = zstd-stream ] && [ "$_rp_done" != "$_rp_count" ] \
            && [ $((_rp_done % frame_chunks)) != 0 ]; then
            echo "image $_rp_name: chunk $_rp_done does not start a frame"; return 1
        fi
        [ "$_rp_open" = 0 ] || [ "$_rp_done" = 0 ] \
            || { echo "image $_rp_name: written before the image ahead of it was done"; return 1; }
        [ "$_rp_done" = "$_rp_count" ] || _rp_open=1
        echo "$_rp_name $_rp_done" >> "$WORK/resume.done"
    done < "$WORK/resume.lines" 8< "$WORK/plan"
}

# resume_check_slot (zstd-stream): each counted chunk read back from the slot against the data
# sha256 of its chunk line; an image resumes at the start of the first frame holding a chunk
# that differs (and every later image from chunk 0).
resume_check_slot() {
    [ -s "$WORK/resume.done" ] || return 0
    _rc_broken=0
    while read -r _rc_name _rc_done; do
        if [ "$_rc_broken" = 1 ] || [ "$_rc_done" = 0 ]; then
            echo "$_rc_name 0"
            continue
        fi
        # shellcheck disable=SC2046  # the fields of the image's plan line
        set -- $(grep "^$_rc_name " "$WORK/plan")
        _rc_size=$2 _rc_count=$4 _rc_dev=$5 _rc_base=$6 _rc_slot=$7 _rc_good=$_rc_done
        awk -v image="$_rc_name" -v done="$_rc_done" \
            '$1 == "chunk" && $2 == image && $3 < done { print $3, $6 }' "$WORK/manifest" \
            > "$WORK/resume.hashes"
        while read -r _rc_index _rc_sha; do
            _rc_data=$((_rc_size - _rc_index * chunk_size))
            [ "$_rc_data" -le "$chunk_size" ] || _rc_data=$chunk_size
            _rc_got=$(slot_read "$_rc_dev" "$_rc_base" "$_rc_slot" $((_rc_index * chunk_size)) "$_rc_data" \
                | sha256sum | cut -d' ' -f1)
            if [ "$_rc_got" != "$_rc_sha" ]; then
                _rc_good=$((_rc_index - _rc_index % frame_chunks))
                log "slot $target: chunk $_rc_index of image $_rc_name changed since it was written; resuming at chunk $_rc_good"
                _rc_broken=1
                break
            fi
        done < "$WORK/resume.hashes"
        echo "$_rc_name $_rc_good"
        [ "$_rc_good" = "$_rc_count" ] || _rc_broken=1
    done < "$WORK/resume.done" > "$WORK/resume.checked"
    mv -f "$WORK/resume.checked" "$WORK/resume.done"
}

# resume_save INDEX: chunk INDEX of $image (and everything before it) is written: sync, then
# record it (atomic_write syncs again).
resume_save() {
    [ "$mode" = write ] && [ "$bundle_type" = full ] || return 0
    sync
    {
        echo "avobuild-resume 1"
        echo "manifest $manifest_sha"
        echo "slot $target"
        _rs_after=0
        while read -r _rs_name _ _ _rs_count _ _rs_base _; do
            if [ "$_rs_name" = "$image" ]; then
                echo "image $_rs_name $_rs_base $(($1 + 1))"
                _rs_after=1
            elif [ "$_rs_after" = 1 ]; then
                echo "image $_rs_name $_rs_base 0"
            else
                echo "image $_rs_name $_rs_base $_rs_count"
            fi
        done < "$WORK/plan"
    } | atomic_write "$RESUME_FILE"
}

# Before the first byte reaches the target slot it stops being a boot candidate.
invalidate_target() {
    if [ "$(slot_var "$target" ok)" != 0 ] || [ -n "$(slot_var "$target" version)" ] \
        || [ "$(slot_var "$target" tries)" != 0 ]; then
        set_slot "$target" 0 0 "" ""
        benv_save
    fi
    rm -f "$STATE_DIR/slot-$target"
}
