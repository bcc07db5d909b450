# --- avocado-update: the update and rollback verbs (applier/shell/verbs.sh) ------------------
bundle_arg() {
    bundle=${bundle:-$(state_get bundle)}
    [ -n "$bundle" ] || usage "$1 --bundle FILE (or '-' for standard input)"
    if [ "$bundle" = - ]; then
        bundle_name="<stdin>"
    else
        [ -f "$bundle" ] || die 1 "$bundle: no such bundle"
        bundle_name=$bundle
    fi
}

parse_common() {
    bundle='' target_arg=inactive url='' version_arg='' output='' follow=0 format=text
    force=0 now_flag=0 preserve=0 backup_current=0 test_mode=0 no_reboot=${AVO_NO_REBOOT:-0}
    partition=inactive includes='' from=current to=previous
    while [ $# -gt 0 ]; do
        case $1 in
        --bundle | --delta) bundle=$2; shift ;;
        --target) target_arg=$2; shift ;;
        --url) url=$2; shift ;;
        --version) version_arg=$2; shift ;;
        -o | --output) output=$2; shift ;;
        --partition) partition=$2; shift ;;
        --include) includes="$includes $2"; shift ;;
        --from) from=$2; shift ;;
        --to) to=$2; shift ;;
        --format) format=$2; shift ;;
        --follow | -f) follow=1 ;;
        --force) force=1 ;;
        --now) now_flag=1 ;;
        --preserve-data) preserve=1 ;;
        --backup-current) backup_current=1 ;;
        --test) test_mode=1 ;;
        --no-reboot) no_reboot=1 ;;
        --verbose | -v) VERBOSE=1 ;;
        --check-hardware | --check-dependencies | --verify | --detailed) ;;
        -) bundle=- ;;
        -h | --help) verb_help "$verb"; exit 0 ;;
        -*) usage "unknown option $1 (avocado-update $verb --help: its usage)" ;;
        *) bundle=$1 ;;
        esac
        shift
    done
}

# An interrupted run (power loss) is found here and ends in Failed; Failed resets to Idle.
reset_if_stale() {
    current=$(state_get state)
    case $current in
    Downloading | Verifying)
        set_state Failed "reason=interrupted while $current"
        set_state Idle ;;
    Applying)
        [ "$(state_get step)" = applied ] || { set_state Failed "reason=interrupted while Applying"; set_state Idle; } ;;
    Failed) set_state Idle ;;
    esac
}

cmd_download() {
    parse_common "$@"
    if [ -z "$url" ] && [ -n "$version_arg" ] && [ -f "$AGENT_CONF" ]; then
        cmd_download_version
        return
    fi
    [ -n "$url" ] || {
        [ -n "$version_arg" ] && [ -n "$DOWNLOAD_URL" ] || usage "download --url URL | --version VERSION"
        is_name identifier "$version_arg" || die 2 "--version: '$version_arg' is not a version"
        url=$(printf '%s' "$DOWNLOAD_URL" | sed "s/{version}/$version_arg/g")
    }
    output=${output:-$STATE_DIR/downloads/update-${version_arg:-latest}.avb}
    mkdir -p "$(dirname "$output")"
    reset_if_stale
    set_state Downloading "bundle=$output"
    # -c resumes a partial file left by an interrupted download.
    wget -q -c -O "$output" "$url" || { set_state Failed "reason=download of $url failed"; die 1 "download of $url failed (rerun to resume)"; }
    sync
    set_state Idle "bundle=$output"
    record download "$url" "$output"
    echo "$output"
}

# Verification shared by verify, validate, simulate: everything, writing nothing.
verify_bundle_file() {
    benv_load
    check_partition_table
    target=$(other_slot "$(booted_slot)")
    if [ "$bundle" = - ]; then
        read_bundle verify
    else
        read_bundle verify < "$bundle"
    fi
}

cmd_verify() {
    parse_common "$@"
    bundle_arg verify
    if boot_state_readable; then
        NO_STATE=1 verify_bundle_file
    else
        NO_STATE=1 verify_off_device
    fi
    echo "verified: $bundle_product $bundle_version for $bundle_compatible"
}

boot_state_readable() {
    case $BOOTLOADER in
    grub) [ -f "$GRUBENV" ] ;;
    *) fw_printenv -c "$FW_CONFIG" > /dev/null 2>&1 ;;
    esac
}

# Off the device (a build host, CI) there is no boot state and no disk: the bundle is checked
# as a device of this applier's product running slot A would check it (signature, manifest,
# policy, every chunk), writing nothing; a delta needs the device's source slot.
verify_off_device() {
    log "no boot state: verifying off the device, as a $COMPATIBLE device running slot A would"
    avo_primary=A avo_compatible=$COMPATIBLE avo_security_version=0 target=B
    DISK=${DISK:-off-device}
    if [ "$bundle" = - ]; then
        read_bundle verify
    else
        read_bundle verify < "$bundle"
    fi
}

cmd_validate() {
    parse_common "$@"
    bundle_arg validate
    NO_STATE=1 verify_bundle_file
    echo "valid: $bundle_version fits slot $target of this $avo_compatible device"
    while read -r name size _ _ _ _ _ plabel _; do
        echo "  image $name ($size bytes) -> $plabel"
    done < "$WORK/plan"
}

cmd_simulate() {
    parse_common "$@"
    bundle_arg simulate
    NO_STATE=1 verify_bundle_file
    booted=$(booted_slot)
    echo "simulate: would install $bundle_version into slot $target (running: $booted)"
    while read -r name size _ _ pdev poff _ plabel _; do
        echo "  would write image $name ($size bytes) to $plabel ($pdev at byte offset $poff)"
    done < "$WORK/plan"
    echo "  would then set avo_primary=$target avo_${target}_tries=$MAX_ATTEMPTS (commit)"
}

cmd_apply() {
    parse_common "$@"
    [ "$target_arg" = inactive ] || usage "apply --target inactive (only the inactive slot can be written)"
    bundle_arg apply
    reset_if_stale
    benv_load
    booted=$(booted_slot)
    target=$(other_slot "$booted")
    [ "$(slot_var "$booted" ok)" = 1 ] \
        || die 5 "the running slot $booted is not confirmed yet: confirm or roll back before applying"
    case $(state_get state) in
    Testing | RollingBack) die 5 "an update is being tested or rolled back (state $(state_get state))" ;;
    esac
    check_partition_table
    set_state Verifying "bundle=$bundle" "target=$target" "step=" "reason="
    if [ "$bundle" = - ]; then
        expected_manifest=
    else
        read_bundle verify < "$bundle"
        expected_manifest=$manifest_sha
    fi
    set_state Applying "target=$target"
    if [ "$bundle" = - ]; then read_bundle write; else read_bundle write < "$bundle"; fi
    rm -f "$RESUME_FILE"
    {
        echo "version=$bundle_version"
        echo "compatible=$bundle_compatible"
        echo "manifest=$manifest_sha"
        cut -d' ' -f1,9,10 "$WORK/plan" | sed 's/^/image /'
    } | atomic_write "$STATE_DIR/slot-$target"
    set_state Applying "step=applied" "version=$bundle_version" "manifest=$manifest_sha" \
        "security=$bundle_security_version"
    record apply "$bundle_version" "slot=$target"
    echo "applied $bundle_version to slot $target; run 'avocado-update commit' to boot it"
}

cmd_commit() {
    parse_common "$@"
    [ "$(state_get state)" = Applying ] && [ "$(state_get step)" = applied ] \
        || die 5 "nothing to commit (state $(state_get state)); apply a bundle first"
    benv_load
    target=$(state_get target)
    version=$(state_get version)
    verify_slot "$target" || die 1 "slot $target does not hold what was applied; apply again"
    flatten_rollback
    attempts=$(cfg boot_failure.max_attempts "$MAX_ATTEMPTS")
    case $attempts in [1-9]) ;; *) die 1 "$ROLLBACK_YAML: boot_failure.max_attempts must be 1 to 9" ;; esac
    avo_primary=$target
    set_slot "$target" 0 "$attempts" "$version" "$(state_get security)"
    benv_save
    set_state Testing
    record commit "$version" "slot=$target" "attempts=$attempts"
    echo "slot $target ($version) boots next, $attempts trial boots; reboot to test it"
}

cmd_confirm() {
    parse_common "$@"
    benv_load
    booted=$(booted_slot)
    [ "$booted" = "$avo_primary" ] || die 5 "running slot $booted is not the primary slot $avo_primary; nothing to confirm"
    if [ "$(slot_var "$booted" ok)" = 1 ]; then
        echo "slot $booted ($(slot_var "$booted" version)) is already confirmed"
        return 0
    fi
    set_slot "$booted" 1 0 "$(slot_var "$booted" version)"
    # Only a confirmed slot raises the anti-rollback floor, so a failed trial can fall back.
    slot_security=$(slot_var "$booted" security_version)
    [ "${slot_security:-0}" -le "${avo_security_version:-0}" ] || avo_security_version=$slot_security
    benv_save
    set_state Active "target=$booted" "step="
    record confirm "$(slot_var "$booted" version)" "slot=$booted"
    telemetry_event confirm "$(slot_var "$booted" version)" ok
    echo "confirmed slot $booted ($(slot_var "$booted" version))"
}

# The boot hook: reconcile the persisted state with what the bootloader actually booted.
cmd_boot() {
    parse_common "$@"
    benv_load
    booted=$(booted_slot)
    target=$(state_get target)
    current=$(state_get state)
    if [ "$current" = Testing ] && [ "$booted" = "$target" ]; then
        # A trial boot of the new release: its boot time (seconds since the kernel started).
        uptime=$(cut -d. -f1 "$PROC/uptime" 2> /dev/null)
        is_number "$uptime" || uptime=0
        telemetry_event boot "$(slot_var "$booted" version)" ok "\"duration\":$uptime"
    fi
    case $current in
    Applying)
        if [ "$(state_get step)" = applied ] && [ "$avo_primary" = "$target" ] && [ "$booted" = "$target" ]; then
            set_state Testing      # commit rewrote the boot state but lost power before its state
        elif [ "$(state_get step)" != applied ]; then
            set_state Failed "reason=interrupted while Applying"
            set_state Idle
        fi ;;
    Testing)
        if [ "$booted" != "$target" ]; then
            tries=$(slot_var "$target" tries)
            set_state RollingBack "reason=boot_failure: slot $target did not boot ($tries trial boots left), the bootloader fell back to slot $booted"
            record rollback "boot_failure" "from=$target" "to=$booted"
            rolled_back "$(slot_var "$target" version)"
            telemetry_event rollback "$(slot_var "$target" version)" failed \
                "\"detail\":$(json_string "boot_failure: slot $target did not boot, back to slot $booted")"
            avo_primary=$booted
            set_slot "$target" 0 0 "$(slot_var "$target" version)"
            benv_save
            set_state Idle
        fi ;;
    RollingBack)
        [ "$booted" != "$target" ] || { record rollback complete "slot=$booted"; set_state Idle; } ;;
    Downloading | Verifying)
        set_state Failed "reason=interrupted while $current"
        set_state Idle ;;
    esac
    echo "booted slot $booted ($(slot_var "$booted" version)), state $(state_get state)"
    # The boot marker: what runs, from the slot's own release file (tests wait for it).
    # shellcheck source=/dev/null  # the slot's release file, written by avobuild
    running=$( . /usr/lib/avobuild/release 2> /dev/null; echo "${AVOBUILD_VERSION:-unknown}")
    echo "AVOBUILD-BOOT-OK slot=$booted version=$running"
}

cmd_status() {
    parse_common "$@"
    benv_load
    booted=$(booted_slot)
    previous=$(other_slot "$booted")
    echo "Current: $(slot_var "$booted" version) (Partition $booted)"
    echo "Previous: $(slot_var "$previous" version) (Partition $previous)"
    echo "State: $(state_get state)"
    echo "Next boot: slot $avo_primary"
    for slot in A B; do
        if [ "$(slot_var "$slot" ok)" = 1 ]; then condition=confirmed
        elif [ -n "$(slot_var "$slot" version)" ]; then condition="unconfirmed, $(slot_var "$slot" tries) tries left"
        else condition=empty; fi
        echo "Slot $slot: ${condition}"
    done
}

do_rollback() {  # REASON: make the other slot primary, mark the running one failed
    to_slot=$(other_slot "$booted")
    set_state RollingBack "target=$to_slot" "reason=$1"
    avo_primary=$to_slot
    if [ "$(slot_var "$to_slot" ok)" != 1 ]; then
        set_slot "$to_slot" 0 "$MAX_ATTEMPTS" "$(slot_var "$to_slot" version)"
    fi
    set_slot "$booted" 0 0 "$(slot_var "$booted" version)"
    benv_save
    record rollback "$1" "from=$booted" "to=$to_slot"
    [ "$1" = manual ] || rolled_back "$(slot_var "$booted" version)"
    telemetry_event rollback "$(slot_var "$booted" version)" failed "\"detail\":$(json_string "$1")"
}

reboot_now() {
    if [ "$no_reboot" = 1 ]; then
        echo "reboot required"
    elif [ "$force" = 1 ]; then
        sync; reboot -f
    else
        reboot
    fi
}

cmd_rollback() {
    parse_common "$@"
    benv_load
    booted=$(booted_slot)
    to_slot=$(other_slot "$booted")
    to_version=$(slot_var "$to_slot" version)
    [ -n "$to_version" ] || die 5 "slot $to_slot holds no system; there is nothing to roll back to"
    if [ "$(slot_var "$to_slot" ok)" != 1 ] && [ "$force" != 1 ]; then
        die 5 "slot $to_slot ($to_version) was never confirmed; use --force to roll back to it anyway"
    fi
    if [ "$test_mode" = 1 ]; then
        echo "rollback test: would make slot $to_slot ($to_version) primary and mark slot $booted failed"
        if [ -f "$STATE_DIR/slot-$to_slot" ]; then
            verify_slot "$to_slot" && echo "rollback test: slot $to_slot content verified" \
                || die 1 "rollback test: slot $to_slot does not match its record"
        else
            echo "rollback test: slot $to_slot has no content record (factory image); not verified"
        fi
        echo "rollback test: the data partition is not touched"
        return 0
    fi
    if [ "$backup_current" = 1 ]; then
        includes=${includes:-" $CONF_DIR"}
        output=$STATE_DIR/backups/rollback-$(date -u +%Y%m%dT%H%M%S).tar
        make_backup
    fi
    [ "$preserve" = 0 ] || info "the data partition is never written by a rollback"
    do_rollback "manual"
    echo "rolled back: slot $to_slot ($to_version) boots next"
    [ "$now_flag" = 0 ] || reboot_now
}

# verify_slot SLOT: the slot's partitions hold exactly what the last apply wrote.
verify_slot() {
    meta=$STATE_DIR/slot-$1
    [ -f "$meta" ] || return 2
    grep '^image ' "$meta" > "$WORK/slot-images"
    while read -r _ name size sha; do
        is_name image_name "$name" && is_number "$size" && is_sha256 "$sha" \
            || { log "$meta: malformed image record"; return 1; }
        slot_device "$name" "$1" || return 1
        got=$(slot_read "$part_dev" "$part_base" "$part_size" 0 "$size" | sha256sum | cut -d' ' -f1)
        [ "$got" = "$sha" ] || { log "slot $1: image $name on $part_label does not match its sha256"; return 1; }
    done < "$WORK/slot-images"
}

resolve_partition() {
    booted=$(booted_slot)
    case $1 in
    inactive | previous) other_slot "$booted" ;;
    active | current) echo "$booted" ;;
    A | B) echo "$1" ;;
    *) usage "--partition active|inactive|A|B" ;;
    esac
}

cmd_verify_partition() {
    parse_common "$@"
    benv_load
    slot=$(resolve_partition "$partition")
    verify_slot "$slot"
    case $? in
    0) echo "slot $slot: verified ($(sed -n 's/^version=//p' "$STATE_DIR/slot-$slot"))" ;;
    2) die 1 "slot $slot: no record of its content (written by the factory, not by an update)" ;;
    *) die 1 "slot $slot: content does not match the record" ;;
    esac
}

cmd_check_compatibility() {
    parse_common "$@"
    benv_load
    from_slot=$(resolve_partition "$from")
    to_slot=$(resolve_partition "$to")
    to_version=$(slot_var "$to_slot" version)
    [ -n "$to_version" ] || die 4 "slot $to_slot is empty"
    to_compatible=$avo_compatible
    [ ! -f "$STATE_DIR/slot-$to_slot" ] || to_compatible=$(sed -n 's/^compatible=//p' "$STATE_DIR/slot-$to_slot")
    [ "$to_compatible" = "$avo_compatible" ] \
        || die 4 "slot $to_slot holds a system for '$to_compatible', this device is '$avo_compatible'"
    echo "compatible: slot $from_slot ($(slot_var "$from_slot" version)) -> slot $to_slot ($to_version) on $avo_compatible"
}

make_backup() {
    mkdir -p "$(dirname "$output")"
    # shellcheck disable=SC2086
    tar -cf "$output.new" $includes 2> "$WORK/tar.err" || die 1 "backup failed: $(cat "$WORK/tar.err")"
    mv -f "$output.new" "$output"
    sync
    record backup "$output" "$includes"
    echo "backup written to $output"
}

cmd_backup() {
    parse_common "$@"
    [ -n "$includes" ] || includes=" $CONF_DIR"
    output=${output:-$STATE_DIR/backups/backup-$(date -u +%Y%m%dT%H%M%S).tar}
    make_backup
}

