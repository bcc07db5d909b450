# --- avocado-update: the delta stream (applier/shell/delta.sh; docs/delta-format.md) ---------
# apply_delta MODE STREAM-SIZE < delta stream: replays one image's delta, fed with the verified
# chunks of the bundle. Runs in the background and leaves "checked", "applied" or the reason
# in $WORK/delta.status.
#   check: writes nothing; every operation is parsed and hashed exactly as for a write, and
#          the target it would produce goes to $WORK/target.fifo (hashed by the caller), so a
#          file install refuses a bad delta before its first write.
#   write: writes the target slot; copy and zero operations go straight from device to device
#          (no temporary copy), data, patch and bspatch operations are decoded and hashed
#          before they are written. The source slot is only ever read.
# Stream version 2 adds `window` (its `extent` lines joined from the source, hashed, and for
# a branch filter filtered with /usr/bin/xz) and `bspatch` (a BSDIFFLZ patch turned into
# BSDIFF40 with xz and bzip2, bspatch against the window, the inverse filter with
# /usr/bin/xz, then the hash check). busybox's own xz applet has no
# filters, so xz is called by its full path.
# Reads the caller's src_dev, src_base, src_part, src_size, src_sha (the source slot: device,
# byte offset, partition size, image size and hash) and dev, base, slot_size, target_size,
# target_sha (the target slot), all checked by parse_manifest.
apply_delta() (
    delta_mode=$1 stream_size=$2
    dfail() {
        clean "$*" "$MAX_ENTRY" > "$WORK/delta.status"
        exit 1
    }
    # emit: in check mode the bytes an operation produces, to the target hasher.
    [ "$delta_mode" = write ] || exec 7> "$WORK/target.fifo"
    # next_line: the next line of the stream, its fields in op a b c d e f g. Every line is
    # ASCII, at most MAX_DELTA_LINE bytes with its LF, fields separated by single spaces.
    # `read` drops NUL bytes, so the bytes consumed are counted and checked at the end.
    next_line() {
        IFS= read -r line || dfail "the stream ends inside a line at byte offset $consumed"
        [ "${#line}" -lt "$MAX_DELTA_LINE" ] || dfail "a line over $MAX_DELTA_LINE bytes at byte offset $consumed"
        consumed=$((consumed + ${#line} + 1))
        set -f
        # shellcheck disable=SC2086  # split at single spaces, checked against the line below
        set -- $line
        set +f
        [ "$line" = "$*" ] || dfail "malformed line at byte offset $((consumed - ${#line} - 1))"
        op=${1:-} a=${2:-} b=${3:-} c=${4:-} d=${5:-} e=${6:-} f=${7:-} g=${8:-} fields=$#
    }
    # decode LENGTH PAYLOAD-SIZE [WINDOW]: the operation's payload from the stream, one zstd
    # frame declaring LENGTH bytes, decoded (capped one byte past LENGTH) into delta.out.
    decode() {
        take "$2" > "$WORK/delta.payload"
        [ "$(size_of "$WORK/delta.payload")" -eq "$2" ] || dfail "the stream ends inside the payload at target offset $a"
        consumed=$((consumed + $2))
        one_zstd_frame "$WORK/delta.payload" "$1" || dfail "the payload at target offset $a is not one zstd frame of $1 bytes"
        if [ -n "${3:-}" ]; then
            zstd -q -d -c --patch-from="$3" < "$WORK/delta.payload" 2> /dev/null
        else
            zstd -q -d -c < "$WORK/delta.payload" 2> /dev/null
        fi | take $(($1 + 1)) > "$WORK/delta.out"
        rm -f "$WORK/delta.payload"
        [ "$(size_of "$WORK/delta.out")" -eq "$1" ] || dfail "operation at target offset $a does not decode to $1 bytes"
    }
    source_range() { slot_read "$src_dev" "$src_base" "$src_part" "$1" "$2"; }
    # put: delta.out into the target at offset a (write), or to the target hasher (check).
    put() {
        if [ "$delta_mode" = write ]; then
            slot_write "$dev" "$base" "$slot_size" "$a" "$b" < "$WORK/delta.out" || dfail "write failed at target offset $a"
            checkpoint
        else
            cat "$WORK/delta.out" >&7
        fi
    }
    # The numbers of the current line: canonical, and for extents inside the images.
    numbers() {
        for value in "$@"; do is_number "$value" || dfail "$op at $a: malformed number"; done
    }

    # load_window: the window line in op a b c d e, then its extent lines: the source ranges
    # joined into delta.window, hashed, and filtered when the line names a filter.
    load_window() {
        numbers "$a" "$b" "$d"
        is_sha256 "$e" || dfail "window at byte offset $line_at: malformed sha256"
        case $c in raw | x86 | arm64) ;; *) dfail "window at byte offset $line_at: unknown filter" ;; esac
        [ "$a" -ge 1 ] && [ "$a" -le "$MAX_WINDOW_EXTENTS" ] && [ "$b" -ge 1 ] && [ "$b" -le "$MAX_DELTA_EXTENT" ] \
            && { [ "$c" != raw ] || [ "$d" = 0 ]; } || dfail "window at byte offset $line_at: bad sizes"
        win_count=$a win_length=$b win_filter=$c win_start=$d win_sha=$e win_at=$line_at win_total=0
        rm -f "$WORK/delta.window"
        : > "$WORK/delta.window.raw"
        while [ "$win_count" -gt 0 ]; do
            next_line
            [ "$fields $op" = "3 extent" ] || dfail "window at byte offset $win_at: expected an extent line"
            numbers "$a" "$b"
            [ "$b" -ge 1 ] && [ "$a" -le "$src_size" ] && [ "$b" -le $((src_size - a)) ] \
                && [ "$b" -le $((win_length - win_total)) ] || dfail "window at byte offset $win_at: extent past the source or the window"
            source_range "$a" "$b" >> "$WORK/delta.window.raw"
            win_total=$((win_total + b)) win_count=$((win_count - 1))
        done
        [ "$win_total" = "$win_length" ] && [ "$(sha_of "$WORK/delta.window.raw")" = "$win_sha" ] \
            || dfail "window at byte offset $win_at: source hash mismatch"
        if [ "$win_filter" = raw ]; then
            mv "$WORK/delta.window.raw" "$WORK/delta.window"
        else
            "$XZ" --format=raw "--$win_filter=start=$win_start" --lzma2=preset=0 -c < "$WORK/delta.window.raw" 2> /dev/null \
                | "$XZ" -d --format=raw --lzma2=preset=0 -c 2> /dev/null > "$WORK/delta.window" \
                && [ "$(size_of "$WORK/delta.window")" = "$win_length" ] || dfail "window at byte offset $win_at: xz $win_filter filter failed"
            rm -f "$WORK/delta.window.raw"
        fi
        win_ready=1
    }
    # bspatch_payload WINDOW OUT PRODUCED: delta.payload, a BSDIFF40 or BSDIFFLZ patch
    # (docs/delta-format.md, 7.5) producing PRODUCED bytes, applied to WINDOW into OUT with
    # bspatch. A BSDIFFLZ patch is first turned into the BSDIFF40 that bspatch reads: each of
    # its raw LZMA2 streams decoded with xz (capped one byte past its bound, xz's status
    # kept) and compressed again with bzip2 -1, one stream at a time.
    bspatch_payload() {
        bp_magic=$(dd if="$WORK/delta.payload" bs=8 count=1 2> /dev/null)
        bp_control=$(od -An -tu8 -j8 -N8 "$WORK/delta.payload" | tr -d ' ')
        bp_diff=$(od -An -tu8 -j16 -N8 "$WORK/delta.payload" | tr -d ' ')
        bp_total=$(size_of "$WORK/delta.payload")
        { [ "$bp_magic" = BSDIFF40 ] || [ "$bp_magic" = BSDIFFLZ ]; } \
            && [ "$(od -An -tu8 -j24 -N8 "$WORK/delta.payload" | tr -d ' ')" = "$3" ] \
            && is_number "$bp_control" $((bp_total - 32)) && is_number "$bp_diff" $((bp_total - 32 - bp_control)) \
            || dfail "the payload at target offset $a is not a BSDIFFLZ or BSDIFF40 patch of $3 bytes"
        if [ "$bp_magic" = BSDIFFLZ ]; then
            bp_at=32 bp_left=$3
            for bp_part in control diff extra; do
                case $bp_part in
                control) bp_size=$bp_control bp_limit=$((24 * ($3 / 24 + 2))) ;;
                diff) bp_size=$bp_diff bp_limit=$3 ;;
                extra) bp_size=$((bp_total - bp_at)) bp_limit=$bp_left ;;
                esac
                rm -f "$WORK/delta.xzfailed"
                dd if="$WORK/delta.payload" bs=65536 skip="$bp_at" count="$bp_size" iflag=skip_bytes,count_bytes 2> /dev/null \
                    | { "$XZ" -d --format=raw --lzma2=dict=8MiB -c 2> /dev/null || : > "$WORK/delta.xzfailed"; } \
                    | take $((bp_limit + 1)) > "$WORK/delta.part"
                bp_decoded=$(size_of "$WORK/delta.part")
                [ ! -e "$WORK/delta.xzfailed" ] && [ "$bp_decoded" -le "$bp_limit" ] \
                    && { [ "$bp_part" != control ] || [ $((bp_decoded % 24)) = 0 ]; } \
                    || dfail "the payload at target offset $a: its $bp_part stream is not one LZMA2 stream of at most $bp_limit bytes"
                [ "$bp_part" != diff ] || bp_left=$(($3 - bp_decoded))
                bz2_compress < "$WORK/delta.part" > "$WORK/delta.$bp_part.bz2" 2> /dev/null \
                    || dfail "the payload at target offset $a: bzip2 failed"
                bp_at=$((bp_at + bp_size))
            done
            rm -f "$WORK/delta.part"
            { printf BSDIFF40; le64 "$(size_of "$WORK/delta.control.bz2")"; le64 "$(size_of "$WORK/delta.diff.bz2")"; le64 "$3"
                cat "$WORK/delta.control.bz2" "$WORK/delta.diff.bz2" "$WORK/delta.extra.bz2"; } > "$WORK/delta.payload"
            rm -f "$WORK/delta.control.bz2" "$WORK/delta.diff.bz2" "$WORK/delta.extra.bz2"
        fi
        bspatch "$1" "$2" "$WORK/delta.payload" 2> /dev/null \
            && [ "$(size_of "$2")" = "$3" ] || dfail "bspatch at $a failed"
    }
    # bz2_compress: stdin compressed with bzip2 -1, the system's bzip2 or else busybox's.
    bz2_compress() {
        if command -v bzip2 > /dev/null 2>&1; then bzip2 -1 -c; else busybox bzip2 -1 -c; fi
    }
    # le64 N: N (at most 2^63-1) as 8 bytes little-endian, BSDIFF40's numbers.
    le64() {
        le_n=$1 le_i=0
        while [ "$le_i" -lt 8 ]; do
            # shellcheck disable=SC2059  # the format is an octal escape, made here
            printf "\\$(printf %o $((le_n % 256)))"
            le_n=$((le_n / 256)) le_i=$((le_i + 1))
        done
    }
    # bspatch_op: the bspatch line in op a b c d e f g: its bsdiff payload applied to the
    # window (and the inverse filter) into delta.out.
    bspatch_op() {
        numbers "$d" "$f"
        is_sha256 "$e" && is_sha256 "$g" || dfail "bspatch at $a: malformed sha256"
        [ "$b" -le "$MAX_DELTA_EXTENT" ] && [ "$f" -ge 32 ] && [ "$f" -le $((b + b / 128 + 512)) ] \
            && { [ "$c" != raw ] || [ "$d" = 0 ]; } || dfail "bspatch at $a: bad sizes"
        [ "$win_ready" = 1 ] && [ "$e" = "$win_sha" ] && [ "$c" = "$win_filter" ] \
            || dfail "bspatch at $a: not the current window"
        take "$f" > "$WORK/delta.payload"
        [ "$(size_of "$WORK/delta.payload")" -eq "$f" ] || dfail "the stream ends inside the payload at target offset $a"
        consumed=$((consumed + f))
        bs_produced=$b
        [ "$c" = raw ] || bs_produced=$((b + 3 * ((b + 65535) / 65536) + 1))
        bspatch_payload "$WORK/delta.window" "$WORK/delta.patched" "$bs_produced"
        rm -f "$WORK/delta.payload"
        if [ "$c" = raw ]; then
            mv "$WORK/delta.patched" "$WORK/delta.out"
        else
            "$XZ" -d --format=raw "--$c=start=$d" --lzma2=preset=0 -c < "$WORK/delta.patched" 2> /dev/null \
                | take $((b + 1)) > "$WORK/delta.out"
            rm -f "$WORK/delta.patched"
        fi
        [ "$(size_of "$WORK/delta.out")" -eq "$b" ] || dfail "bspatch at $a does not produce $b bytes"
        [ "$(sha_of "$WORK/delta.out")" = "$g" ] || dfail "bspatch at $a: hash mismatch"
    }

    # zstd_version: the device zstd's version as ZSTD_versionNumber (10504 for 1.5.4).
    zstd_version() {
        zv=$(zstd -V 2> /dev/null | sed -n 's/.* v\([0-9][0-9]*\)\.\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2 \3/p')
        set -f
        # shellcheck disable=SC2086  # three numbers, checked below
        set -- $zv
        set +f
        [ "$#" = 3 ] && is_number "$1" 999 && is_number "$2" 99 && is_number "$3" 99 || return 1
        echo $(($1 * 10000 + $2 * 100 + $3))
    }
    # load_zwindow: the zwindow line in op a b c, then its zextent lines: each source block
    # unpacked (zstd -d, capped) and appended to delta.zwindow, the whole hashed.
    load_zwindow() {
        numbers "$a" "$b"
        is_sha256 "$c" || dfail "zwindow at byte offset $line_at: malformed sha256"
        [ "$a" -ge 1 ] && [ "$a" -le "$MAX_WINDOW_EXTENTS" ] && [ "$b" -ge 1 ] && [ "$b" -le "$MAX_DELTA_EXTENT" ] \
            || dfail "zwindow at byte offset $line_at: bad sizes"
        zwin_count=$a zwin_length=$b zwin_sha=$c zwin_at=$line_at zwin_total=0 zwin_ready=0
        : > "$WORK/delta.zwindow"
        while [ "$zwin_count" -gt 0 ]; do
            next_line
            [ "$fields $op" = "5 zextent" ] || dfail "zwindow at byte offset $zwin_at: expected a zextent line"
            numbers "$a" "$b" "$c"
            [ "$b" -ge 1 ] && [ "$b" -le "$MAX_PACKED_BLOCK" ] && [ "$c" -ge 1 ] && [ "$c" -le "$MAX_PACKED_BLOCK" ] \
                && [ "$a" -le "$src_size" ] && [ "$b" -le $((src_size - a)) ] && [ "$c" -le $((zwin_length - zwin_total)) ] \
                && { [ "$d" = zstd ] || { [ "$d" = raw ] && [ "$b" = "$c" ]; }; } \
                || dfail "zwindow at byte offset $zwin_at: zextent past the source or the window"
            if [ "$d" = zstd ]; then
                source_range "$a" "$b" | zstd -q -d -c 2> /dev/null | take $((c + 1)) > "$WORK/delta.zextent"
            else
                source_range "$a" "$b" > "$WORK/delta.zextent"
            fi
            [ "$(size_of "$WORK/delta.zextent")" = "$c" ] || dfail "zwindow at byte offset $zwin_at: a source block does not unpack to $c bytes"
            cat "$WORK/delta.zextent" >> "$WORK/delta.zwindow"
            zwin_total=$((zwin_total + c)) zwin_count=$((zwin_count - 1))
        done
        rm -f "$WORK/delta.zextent"
        [ "$zwin_total" = "$zwin_length" ] && [ "$(sha_of "$WORK/delta.zwindow")" = "$zwin_sha" ] \
            || dfail "zwindow at byte offset $zwin_at: unpacked source hash mismatch"
        zwin_ready=1
    }
    # recompress_op: the recompress line in op a b c d e f g, its block lines, its payload
    # (a zstd frame against delta.zwindow, or a bsdiff patch of it) unpacked, then each block
    # compressed from a file with `zstd -LEVEL --no-check`, hashed and appended to delta.out.
    recompress_op() {
        numbers "$c" "$d" "$g"
        is_sha256 "$f" || dfail "recompress at $a: malformed sha256"
        [ "$b" -le "$MAX_DELTA_EXTENT" ] && [ "$c" -ge 1 ] && [ "$c" -le "$MAX_RECOMPRESS_BLOCKS" ] \
            && [ "$d" -ge 1 ] && [ "$d" -le "$MAX_RECOMPRESS_LEVEL" ] && [ "$g" -ge 1 ] \
            && { [ "$e" = patch ] || { [ "$e" = bspatch ] && [ "$g" -ge 32 ]; }; } || dfail "recompress at $a: bad sizes"
        [ "$zstd_ready" = 1 ] || dfail "recompress at $a: the stream has no zstd-version line"
        [ "$zwin_ready" = 1 ] && [ "$f" = "$zwin_sha" ] || dfail "recompress at $a: not the current zwindow"
        rc_at=$a rc_length=$b rc_count=$c rc_level=$d rc_method=$e rc_payload=$g rc_unpacked=0 rc_stored=0
        : > "$WORK/delta.blocks"
        while [ "$rc_count" -gt 0 ]; do
            next_line
            [ "$fields $op" = "5 block" ] || dfail "recompress at $rc_at: expected a block line"
            numbers "$a" "$b"
            is_sha256 "$d" || dfail "recompress at $rc_at: malformed block sha256"
            [ "$a" -ge 1 ] && [ "$a" -le "$MAX_PACKED_BLOCK" ] && [ "$b" -ge 1 ] && [ "$b" -le "$a" ] \
                && { [ "$c" = zstd ] || { [ "$c" = raw ] && [ "$a" = "$b" ]; }; } || dfail "recompress at $rc_at: bad block sizes"
            rc_unpacked=$((rc_unpacked + a)) rc_stored=$((rc_stored + b)) rc_count=$((rc_count - 1))
            echo "$a $b $c $d" >> "$WORK/delta.blocks"
        done
        a=$rc_at b=$rc_length
        [ "$rc_stored" = "$rc_length" ] && [ "$rc_unpacked" -le "$MAX_DELTA_EXTENT" ] \
            && [ "$rc_payload" -le $((rc_unpacked + rc_unpacked / 128 + 512)) ] || dfail "recompress at $a: the blocks do not add up"
        if [ "$rc_method" = patch ]; then
            decode "$rc_unpacked" "$rc_payload" "$WORK/delta.zwindow"
            mv "$WORK/delta.out" "$WORK/delta.unpacked"
        else
            take "$rc_payload" > "$WORK/delta.payload"
            [ "$(size_of "$WORK/delta.payload")" -eq "$rc_payload" ] || dfail "the stream ends inside the payload at target offset $a"
            consumed=$((consumed + rc_payload))
            bspatch_payload "$WORK/delta.zwindow" "$WORK/delta.unpacked" "$rc_unpacked"
            rm -f "$WORK/delta.payload"
        fi
        : > "$WORK/delta.out"
        rc_position=0 rc_index=0
        while read -r rc_block_length rc_block_stored rc_packing rc_sha; do
            dd if="$WORK/delta.unpacked" bs=65536 skip="$rc_position" count="$rc_block_length" \
                iflag=skip_bytes,count_bytes 2> /dev/null > "$WORK/delta.block"
            if [ "$rc_packing" = zstd ]; then
                zstd "-$rc_level" --no-check -q -c "$WORK/delta.block" 2> /dev/null | take $((rc_block_stored + 1)) > "$WORK/delta.stored"
            else
                mv "$WORK/delta.block" "$WORK/delta.stored"
            fi
            [ "$(size_of "$WORK/delta.stored")" = "$rc_block_stored" ] && [ "$(sha_of "$WORK/delta.stored")" = "$rc_sha" ] \
                || dfail "recompress at $a: block $rc_index recompressed with zstd -$rc_level is not the stored block"
            cat "$WORK/delta.stored" >> "$WORK/delta.out"
            rc_position=$((rc_position + rc_block_length)) rc_index=$((rc_index + 1))
        done < "$WORK/delta.blocks"
        rm -f "$WORK/delta.unpacked" "$WORK/delta.block" "$WORK/delta.stored" "$WORK/delta.blocks"
    }

    consumed=0 win_ready=0 zwin_ready=0 zstd_ready=0
    next_line
    case "$fields $op $a" in
    "2 avobuild-delta 1" | "2 avobuild-delta 2") version=$a ;;
    *) dfail "not a version 1 or 2 delta stream" ;;
    esac
    next_line
    [ "$fields $op $a $b" = "3 source $src_size $src_sha" ] || dfail "the stream's source line differs from the manifest"
    next_line
    [ "$fields $op $a $b" = "3 target $target_size $target_sha" ] || dfail "the stream's target line differs from the manifest"
    position=0 count=0 header_end=$consumed
    while :; do
        next_line
        [ "$op" != end ] || break
        line_at=$((consumed - ${#line} - 1))
        case $version:$op:$fields in
        ?:copy:5 | ?:zero:3 | ?:data:5 | ?:patch:8 | 2:bspatch:8) ;;
        2:window:6)
            load_window
            continue ;;
        2:zwindow:4)
            load_zwindow
            continue ;;
        2:zstd-version:2)
            # Before anything is written: the blocks were checked with exactly this zstd.
            [ "$line_at" = "$header_end" ] && is_number "$a" || dfail "zstd-version at byte offset $line_at: not right after the target line"
            device_zstd=$(zstd_version) || dfail "zstd -V prints no version"
            [ "$device_zstd" = "$a" ] || dfail "the delta recompresses squashfs blocks with zstd $((a / 10000)).$((a / 100 % 100)).$((a % 100)), this device has $((device_zstd / 10000)).$((device_zstd / 100 % 100)).$((device_zstd % 100))"
            zstd_ready=1
            continue ;;
        2:recompress:8) ;;
        *) dfail "malformed delta operation at byte offset $line_at" ;;
        esac
        numbers "$a" "$b"
        [ "$a" = "$position" ] && [ "$b" -ge 1 ] && [ "$b" -le $((target_size - a)) ] \
            || dfail "operation $op at $a does not continue the target at $position within its $target_size bytes"
        case $op in
        copy)
            numbers "$c"
            is_sha256 "$d" || dfail "copy at $a: malformed sha256"
            [ "$c" -le "$src_size" ] && [ "$b" -le $((src_size - c)) ] || dfail "copy at $a reads past the source"
            if [ "$delta_mode" = write ]; then
                [ "$(source_range "$c" "$b" | sha256sum | cut -d' ' -f1)" = "$d" ] \
                    || dfail "copy at $a: source hash mismatch"
                slot_copy "$src_dev" "$src_base" "$src_part" "$c" "$dev" "$base" "$slot_size" "$a" "$b" \
                    || dfail "copy at $a: write failed"
                checkpoint
            else
                [ "$(source_range "$c" "$b" | tee "$WORK/target.fifo" | sha256sum | cut -d' ' -f1)" = "$d" ] \
                    || dfail "copy at $a: source hash mismatch"
            fi ;;
        zero)
            if [ "$delta_mode" = write ]; then
                slot_zero "$dev" "$base" "$slot_size" "$a" "$b" || dfail "zero at $a: write failed"
                checkpoint
            else
                dd if=/dev/zero bs=65536 count="$b" iflag=count_bytes 2> /dev/null >&7
            fi ;;
        data)
            numbers "$c"
            is_sha256 "$d" || dfail "data at $a: malformed sha256"
            [ "$b" -le "$MAX_DELTA_EXTENT" ] && [ "$c" -ge 1 ] && [ "$c" -le $((b + b / 128 + 512)) ] \
                || dfail "data at $a: bad sizes"
            decode "$b" "$c"
            [ "$(sha_of "$WORK/delta.out")" = "$d" ] || dfail "data at $a: hash mismatch"
            put ;;
        patch)
            numbers "$c" "$d" "$f"
            is_sha256 "$e" && is_sha256 "$g" || dfail "patch at $a: malformed sha256"
            [ "$b" -le "$MAX_DELTA_EXTENT" ] && [ "$d" -ge 1 ] && [ "$d" -le "$MAX_DELTA_EXTENT" ] \
                && [ "$c" -le "$src_size" ] && [ "$d" -le $((src_size - c)) ] \
                && [ "$f" -ge 1 ] && [ "$f" -le $((b + b / 128 + 512)) ] || dfail "patch at $a: bad sizes"
            source_range "$c" "$d" > "$WORK/delta.dictionary"
            [ "$(sha_of "$WORK/delta.dictionary")" = "$e" ] || dfail "patch at $a: source window hash mismatch"
            decode "$b" "$f" "$WORK/delta.dictionary"
            rm -f "$WORK/delta.dictionary"
            [ "$(sha_of "$WORK/delta.out")" = "$g" ] || dfail "patch at $a: hash mismatch"
            put ;;
        bspatch)
            bspatch_op
            put ;;
        recompress)
            recompress_op
            put ;;
        esac
        rm -f "$WORK/delta.out"
        position=$((a + b))
        count=$((count + 1))
    done
    rm -f "$WORK/delta.window" "$WORK/delta.zwindow"
    [ "$fields" = 2 ] && is_number "$a" && [ "$a" = "$count" ] || dfail "missing or wrong end line"
    [ "$position" = "$target_size" ] || dfail "the operations end at $position, not $target_size"
    [ "$(take 1 | wc -c | tr -d ' ')" -eq 0 ] && [ "$consumed" = "$stream_size" ] \
        || dfail "data after the end line, or bytes the lines cannot hold (NUL)"
    if [ "$delta_mode" = write ]; then echo applied; else echo checked; fi > "$WORK/delta.status"
)
