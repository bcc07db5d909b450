# --- avocado-update: messages, persistent state, boot state, slots (applier/shell/state.sh) ---
WORK=$TMP_ROOT/avocado-update.$$
STATE_FILE=$STATE_DIR/state
HISTORY=$STATE_DIR/history
VERBOSE=0

# Exit codes: 1 failure, 2 usage, 3 bundle refused, 4 incompatible, 5 not now (state).
log() { printf 'avocado-update: %s\n' "$(clean "$*" 1024)" >&2; }
info() { [ "$VERBOSE" -eq 0 ] || log "$@"; }
die() {
    _die_code=$1
    shift
    log "$*"
    exit "$_die_code"
}
usage() { die 2 "usage: $*"; }
now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
other_slot() { if [ "$1" = A ]; then echo B; else echo A; fi; }
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- persistent update state on the data partition -------------------------------------------
state_get() {
    [ -f "$STATE_FILE" ] || { [ "$1" = state ] && echo Idle; return 0; }
    sed -n "s/^$1=//p" "$STATE_FILE" | head -n 1
}

# set_state STATE [key=value...]: keys not given are kept only when STATE keeps the update.
# Each value is cleaned and cut to MAX_ENTRY bytes, so no input can grow the file.
set_state() {
    _ss_state=$1
    shift
    mkdir -p "$STATE_DIR" || die 1 "$STATE_DIR: cannot create the state directory"
    {
        echo "state=$_ss_state"
        echo "since=$(now)"
        for _ss_pair in "$@"; do
            printf '%s=%s\n' "${_ss_pair%%=*}" "$(clean "${_ss_pair#*=}" "$MAX_ENTRY")"
        done
        if [ -f "$STATE_FILE" ]; then
            for _ss_key in target version bundle manifest step reason security; do
                case " $* " in *" $_ss_key="*) continue ;; esac
                _ss_value=$(state_get "$_ss_key")
                [ -z "$_ss_value" ] || printf '%s=%s\n' "$_ss_key" "$_ss_value"
            done
        fi
    } | atomic_write "$STATE_FILE" || die 1 "$STATE_FILE: cannot be written"
    record "state" "$_ss_state" "$@"
}

# History: one tab-separated line per event (time, event, detail), the detail cleaned and cut
# to MAX_ENTRY bytes; past MAX_HISTORY bytes the file becomes history.1 and a new one starts.
record() {
    mkdir -p "$STATE_DIR" 2> /dev/null || return 0
    _rc_event=$1
    shift
    _rc_detail=$(clean "$*" "$MAX_ENTRY")
    if [ -f "$HISTORY" ] && [ "$(size_of "$HISTORY")" -ge "$MAX_HISTORY" ]; then
        mv -f "$HISTORY" "$HISTORY.1"
    fi
    printf '%s\t%s\t%s\n' "$(now)" "$_rc_event" "$_rc_detail" >> "$HISTORY"
}

# --- boot state (docs/architecture.md: the slot state shared with the bootloader) -------------
benv_load() {
    case $BOOTLOADER in
    grub)
        [ -f "$GRUBENV" ] || die 1 "$GRUBENV: boot state missing (is the ESP mounted?)"
        grubenv_read "$GRUBENV" || die 1 "$GRUBENV: not a 1024-byte GRUB environment block"
        ;;
    u-boot)
        fw_printenv -c "$FW_CONFIG" > "$WORK/benv" 2> /dev/null \
            || die 1 "fw_printenv -c $FW_CONFIG: cannot read the U-Boot environment"
        env_vars_read "$WORK/benv"
        ;;
    esac
    is_name slot_name "$avo_primary" || die 1 "boot state: avo_primary is '$avo_primary', expected A or B"
    [ -n "$avo_compatible" ] || avo_compatible=$COMPATIBLE
    is_name identifier "$avo_compatible" || die 1 "boot state: avo_compatible '$avo_compatible' is not a compatible string"
    benv_number avo_security_version
    for _bl_slot in A B; do
        case $(slot_var "$_bl_slot" ok) in "" | 0 | 1) ;; *) die 1 "boot state: avo_${_bl_slot}_ok must be 0 or 1" ;; esac
        benv_number "avo_${_bl_slot}_tries"
        benv_number "avo_${_bl_slot}_security_version"
        _bl_version=$(slot_var "$_bl_slot" version)
        [ -z "$_bl_version" ] || is_name identifier "$_bl_version" \
            || die 1 "boot state: avo_${_bl_slot}_version '$_bl_version' is not a version"
    done
}

# benv_number NAME: the boot state variable NAME is empty or a number (it meets arithmetic).
benv_number() {
    eval "_bn_value=\$$1"
    [ -z "$_bn_value" ] || is_number "$_bn_value" || die 1 "boot state: $1 is '$_bn_value', expected a number"
}

benv_save() {
    case $BOOTLOADER in
    grub)
        grubenv_write "$GRUBENV" || die 1 "$GRUBENV: cannot be written (the boot state must fit 1024 bytes)"
        ;;
    u-boot)
        # libubootenv's script format is name=value; an empty value deletes the variable.
        for _bs_name in $BENV_VARS; do
            eval "printf '%s=%s\n' $_bs_name \"\$$_bs_name\""
        done > "$WORK/benv.script"
        fw_setenv -c "$FW_CONFIG" -s "$WORK/benv.script" || die 1 "fw_setenv -c $FW_CONFIG failed"
        # The environment may be a file on the FAT boot partition: sync, as for grubenv.
        sync
        checkpoint
        ;;
    esac
}

slot_var() { eval "echo \"\$avo_${1}_$2\""; }
# set_slot SLOT OK TRIES VERSION [SECURITY-VERSION]
set_slot() {
    eval "avo_${1}_ok=\$2 avo_${1}_tries=\$3 avo_${1}_version=\$4"
    [ $# -lt 5 ] || eval "avo_${1}_security_version=\$5"
}

# The slot the running system booted from: avo.slot= on the kernel command line.
booted_slot() {
    _bs_slot=$(tr ' ' '\n' < "$PROC/cmdline" 2> /dev/null | sed -n 's/^avo\.slot=//p' | head -n 1)
    if is_name slot_name "$_bs_slot"; then echo "$_bs_slot"; else echo "$avo_primary"; fi
}

# --- the disk and its slots --------------------------------------------------------------------
# hex_at FILE OFFSET LENGTH: LENGTH bytes of FILE from OFFSET, as lowercase hex.
hex_at() {
    dd if="$1" bs=65536 skip="$2" count="$3" iflag=skip_bytes,count_bytes 2> /dev/null \
        | od -An -tx1 -v | tr -d ' \n'
}

# check_partition_table: the disk holds the partition table this applier was rendered for
# (every partition of the layout where the layout puts it, with its type, identifiers and
# name), and its last partition ends inside the disk; run before the first write, so that no
# offset of the layout ever lands in a different partition or grows a disk image file.
check_partition_table() {
    if [ -z "$DISK" ]; then
        check_partition_devices
        return
    fi
    [ -e "$DISK" ] || die 1 "$DISK: no such disk"
    IFS=,
    for _pt_check in $TABLE_CHECKS; do
        _pt_offset=${_pt_check%%:*}
        _pt_rest=${_pt_check#*:}
        _pt_hex=${_pt_rest%%:*}
        if [ "$(hex_at "$DISK" "$_pt_offset" $((${#_pt_hex} / 2)))" != "$_pt_hex" ]; then
            unset IFS
            die 1 "$DISK: not the $TABLE_TYPE partition table this applier was rendered for: its ${_pt_rest#*:} (byte offset $_pt_offset) differs (an MBR disk, another layout, a damaged table?); nothing was written"
        fi
    done
    unset IFS
    [ "$(dd if="$DISK" bs=1 skip=$((TABLE_END - 1)) count=1 2> /dev/null | wc -c | tr -d ' ')" = 1 ] \
        || die 1 "$DISK: shorter than its partition table says ($TABLE_END bytes needed; a truncated image?); nothing was written"
}

# Without DISK, each partition is its own block device: the kernel's view of it (sysfs) must
# match the layout.
check_partition_devices() {
    IFS=,
    for _pd_entry in $PARTITIONS; do
        IFS=:
        # shellcheck disable=SC2086  # the fields of one entry
        set -- $_pd_entry
        IFS=,
        partition_lookup "$1" || { unset IFS; die 1 "no partition named $1 (the layout's); nothing was written"; }
        partition_geometry && [ "$part_start" = "$2" ] && [ "$part_bytes" = "$3" ] \
            || { unset IFS; die 1 "$part_dev ($1): not where the layout puts it (byte offset $2, $3 bytes); nothing was written"; }
    done
    unset IFS
}

# slot_device IMAGE SLOT: slot_partition plus where to read and write it: part_dev and
# part_base (the slot's byte offset on part_dev).
slot_device() {
    slot_partition "$1" "$2" || return 1
    if [ -n "$DISK" ]; then
        part_dev=$DISK
        part_base=$part_offset
    else
        partition_lookup "$part_label" || return 1
        part_base=0
    fi
}

# in_slot SLOT-SIZE OFFSET LENGTH: [OFFSET, +LENGTH) lies inside a slot of SLOT-SIZE bytes
# (all three checked numbers).
in_slot() { [ "$2" -le "$1" ] && [ "$3" -le $(($1 - $2)) ]; }

# slot_read DEV BASE SLOT-SIZE OFFSET LENGTH: bytes [OFFSET, +LENGTH) of a slot, to stdout.
slot_read() {
    in_slot "$3" "$4" "$5" || return 1
    dd if="$1" bs=65536 skip=$(($2 + $4)) count="$5" iflag=skip_bytes,count_bytes 2> /dev/null
}

# slot_write DEV BASE SLOT-SIZE OFFSET LENGTH < DATA: LENGTH bytes of stdin into a slot.
slot_write() {
    in_slot "$3" "$4" "$5" || return 1
    dd of="$1" bs=65536 seek=$(($2 + $4)) count="$5" iflag=count_bytes,fullblock \
        oflag=seek_bytes conv=notrunc 2> /dev/null
}

# slot_zero DEV BASE SLOT-SIZE OFFSET LENGTH: LENGTH zero bytes into a slot.
slot_zero() { slot_write "$@" < /dev/zero; }

# slot_copy FROM-DEV FROM-BASE FROM-SIZE FROM-OFFSET TO-DEV TO-BASE TO-SIZE TO-OFFSET LENGTH:
# one slot's bytes into another, straight from device to device.
slot_copy() {
    in_slot "$3" "$4" "$9" && in_slot "$7" "$8" "$9" || return 1
    dd if="$1" of="$5" bs=65536 skip=$(($2 + $4)) seek=$(($6 + $8)) count="$9" \
        iflag=skip_bytes,count_bytes oflag=seek_bytes conv=notrunc 2> /dev/null
}
