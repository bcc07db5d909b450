# --- avobuild shell library (avobuild/applier/shell/lib.sh) ---------------------------------
# Shared by the on-target applier (avocado-update) and the recovery system (avocado-recovery):
# number parsing, name grammars, untrusted text, exact reads, atomic writes, the GRUB
# environment block and partition lookup. POSIX sh for busybox ash. Variables of a function
# start with `_` and the function's initials, since POSIX sh has no `local`.
# Uses: WORK (a private temporary directory), SYS (sysfs, default /sys), and a function
# `checkpoint`, called after every write a power cut may interrupt.

# is_number TEXT [MAX]: TEXT is a canonical decimal number (`0` or `[1-9][0-9]*`) of at most
# MAX (default and ceiling 2^63-1). Every number from outside the script passes here before
# it reaches `$(( ))` or `[ -lt ]`: there a leading zero means octal (`$(( ))`) or is
# silently dropped (`[ ]`), a sign or a space is accepted, and a value past 2^63-1 wraps.
is_number() {
    case $1 in
    0) ;;
    "" | 0* | *[!0-9]*) return 1 ;;
    esac
    [ "${#1}" -le 19 ] || return 1
    if [ "${#1}" -eq 19 ]; then
        # 19 digits: compared in two halves, each of which 64-bit arithmetic holds.
        _in_high=${1%?????????}
        _in_low=${1#??????????}
        [ "$_in_high" -lt 9223372036 ] \
            || { [ "$_in_high" -eq 9223372036 ] && [ "$_in_low" -le 854775807 ]; } \
            || return 1
    fi
    [ $# -lt 2 ] || [ "$1" -le "$2" ]
}

# is_name GRAMMAR TEXT: TEXT is a name of GRAMMAR (identifier, compatible_glob, image_name,
# slot_name), whose patterns name_grammar holds, rendered from avobuild/model/names.py.
is_name() { name_grammar "$1" && grammar_check "$2" "$ng_first" "$ng_rest" "$ng_max"; }

# grammar_check TEXT BAD-FIRST BAD-REST MAX-LENGTH: TEXT is 1 to MAX-LENGTH characters, the
# first not matching the pattern BAD-FIRST, none of the others matching BAD-REST.
grammar_check() {
    # shellcheck disable=SC2254  # the patterns are patterns
    case $1 in
    "" | $2* | ?*$3*) return 1 ;;
    esac
    [ "${#1}" -le "$4" ]
}

is_sha256() {
    case $1 in *[!0-9a-f]*) return 1 ;; esac
    [ "${#1}" -eq 64 ]
}

# clean TEXT [MAX]: TEXT cut to MAX bytes (default 256), every byte outside printable ASCII
# replaced by `?`. Untrusted text is never echoed raw: no terminal escapes, no 0xff, no line
# breaks in messages, state files, history or JSON.
clean() { printf '%s' "$1" | head -c "${2:-256}" | LC_ALL=C tr -c ' -~' '?'; }

# json_string TEXT [MAX]: TEXT, cleaned, as a JSON string.
json_string() {
    _js_text=$(clean "$1" "${2:-1024}" | sed 's/[\\"]/\\&/g')
    printf '"%s"' "$_js_text"
}

# size_of FILE: its size in bytes (stat: wc -c would read it, at a few MB/s in busybox).
size_of() { stat -c %s "$1"; }
sha_of() { sha256sum < "$1" | cut -d' ' -f1; }
# take N: exactly N bytes from stdin (dd never reads ahead; busybox head -c may, on a pipe).
take() { dd bs=65536 count="$1" iflag=count_bytes,fullblock 2> /dev/null; }

# atomic_write FILE < CONTENT: a power cut leaves either the old or the new FILE. Calls
# `checkpoint` after the write (each program defines it: hooks.sh, test-hooks.sh).
atomic_write() {
    cat > "$1.new" || return 1
    sync "$1.new" 2> /dev/null || sync
    mv -f "$1.new" "$1" || return 1
    # A full sync, not just the directory: on vfat (the ESP) the new file's FAT entries stay
    # dirty in memory after fsync, and a power cut would leave the file pointing at free
    # clusters (reproduced in QEMU; tests/test_device_lifecycle.py cuts power after writes).
    sync
    checkpoint
}

# --- the GRUB environment block (docs/architecture.md, "The slot state") --------------------
BENV_VARS="avo_primary avo_compatible avo_A_ok avo_A_tries avo_A_version avo_A_security_version avo_B_ok avo_B_tries avo_B_version avo_B_security_version avo_security_version"

# grubenv_read FILE: the variables of BENV_VARS from a GRUB environment block (env_vars_read).
# Status 1 for a file that is not a 1024-byte block.
grubenv_read() {
    [ -f "$1" ] && [ "$(size_of "$1")" = 1024 ] \
        && [ "$(head -n 1 "$1")" = "# GRUB Environment Block" ] || return 1
    env_vars_read "$1"
}

# env_vars_read FILE: set the variables of BENV_VARS from the NAME=VALUE lines of FILE (empty
# when absent; the first definition counts). Values are assigned, never evaluated.
env_vars_read() {
    _ev_seen=
    for _ev_name in $BENV_VARS; do eval "$_ev_name="; done
    while IFS= read -r _ev_line; do
        _ev_name=${_ev_line%%=*}
        [ "$_ev_name" != "$_ev_line" ] || continue
        case $_ev_name in "" | *[!A-Za-z0-9_]*) continue ;; esac
        case " $BENV_VARS " in *" $_ev_name "*) ;; *) continue ;; esac
        case " $_ev_seen " in *" $_ev_name "*) continue ;; esac
        _ev_seen="$_ev_seen $_ev_name"
        _ev_value=${_ev_line#*=}
        eval "$_ev_name=\$_ev_value"
    done < "$1"
}

# grubenv_write FILE: the BENV_VARS variables in that order (the host installer's; security
# versions only when set and not 0), then the other variables FILE holds, padded with `#` to
# 1024 bytes, replacing FILE atomically. Status 1 when the block would not fit.
grubenv_write() {
    _gw_file=$1
    _gw_value=''
    {
        echo "# GRUB Environment Block"
        for _gw_name in $BENV_VARS; do
            eval "_gw_value=\$$_gw_name"
            case $_gw_name:$_gw_value in *security_version: | *security_version:0) continue ;; esac
            printf '%s=%s\n' "$_gw_name" "$_gw_value"
        done
        if [ -f "$_gw_file" ]; then
            while IFS= read -r _gw_line; do
                case $_gw_line in "#"* | "") continue ;; esac
                case " $BENV_VARS " in *" ${_gw_line%%=*} "*) continue ;; esac
                printf '%s\n' "$_gw_line"
            done < "$_gw_file"
        fi
    } > "$WORK/grubenv.block" || return 1
    _gw_used=$(size_of "$WORK/grubenv.block")
    [ "$_gw_used" -le 1024 ] || return 1
    if [ "$_gw_used" -lt 1024 ]; then
        dd if=/dev/zero bs=$((1024 - _gw_used)) count=1 2> /dev/null | tr '\0' '#' \
            >> "$WORK/grubenv.block" || return 1
    fi
    atomic_write "$_gw_file" < "$WORK/grubenv.block"
}

# --- partitions ------------------------------------------------------------------------------
# partition_lookup LABEL: the partition whose GPT name is LABEL, from sysfs (no udev needed):
# sets part_dev (/dev/...) and part_sysfs (its /sys/class/block directory).
partition_lookup() {
    for _pl_uevent in "${SYS:-/sys}"/class/block/*/uevent; do
        [ -f "$_pl_uevent" ] && grep -Fqx "PARTNAME=$1" "$_pl_uevent" 2> /dev/null || continue
        _pl_name=$(sed -n 's/^DEVNAME=//p' "$_pl_uevent")
        [ -n "$_pl_name" ] || continue
        part_dev=/dev/$_pl_name
        part_sysfs=${_pl_uevent%/uevent}
        return 0
    done
    return 1
}

# partition_geometry: the byte offset and size of partition part_sysfs on its disk (sysfs
# counts 512-byte sectors whatever the logical block size), as part_start and part_bytes.
partition_geometry() {
    _pg_start=$(cat "$part_sysfs/start" 2> /dev/null)
    _pg_size=$(cat "$part_sysfs/size" 2> /dev/null)
    is_number "$_pg_start" 18014398509481983 && is_number "$_pg_size" 18014398509481983 || return 1
    part_start=$((_pg_start * 512))
    part_bytes=$((_pg_size * 512))
}
