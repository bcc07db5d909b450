#!/bin/sh
# avocado-recovery: the recovery menu and its actions (busybox sh, no bashisms).
#
#   avocado-recovery [menu]          the interactive menu (serial console and screen)
#   avocado-recovery restore [--yes] factory reset: write the factory image to the device disk
#   avocado-recovery repair          check filesystems, make a bootable slot primary
#   avocado-recovery repair-boot     check the boot partition, rewrite it from the factory image
#   avocado-recovery reset-config    return the data partition to its factory state
#   avocado-recovery diagnose [--full]
#   avocado-recovery shell
#
# Product settings (partition labels, offsets, image names) come from
# /etc/avobuild/recovery.conf, written by `avobuild` for one layout. The shell library shared
# with the on-target applier (number parsing, the GRUB environment block, partition lookup)
# is linked in before this code (avobuild/applier/shell/lib.sh).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# shellcheck source=/dev/null
. /etc/avobuild/recovery.conf
# shellcheck source=/dev/null
[ ! -f /run/avobuild-boot.conf ] || . /run/avobuild-boot.conf
export SYS=/sys  # for the shell library
WORK=/tmp/avocado-recovery.$$
checkpoint() { :; }  # called by the library after each write; nothing to count here
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

MEDIUM=/run/avobuild/medium
NETCONF=/etc/avocado/network-recovery.conf
APPLIER=/usr/sbin/avocado-update
LOCK=/run/avobuild/action.lock

say() { echo "avocado-recovery: $*"; }
fail() { echo "avocado-recovery: error: $*" >&2; return 1; }

# --- finding things --------------------------------------------------------------------------

# The block device of the partition whose GPT name is $1 (e.g. /dev/vda2), from sysfs.
partition_device() {
    [ -n "$1" ] && partition_lookup "$1" || return 1
    echo "$part_dev"
}

# The whole disk holding the device's partitions (found by the system-a label).
device_disk() {
    if [ -n "${AVO_TARGET:-}" ]; then
        echo "$AVO_TARGET"
        return 0
    fi
    part=$(partition_device "$AVO_LABEL_SYSTEM_A") || return 1
    name=${part#/dev/}
    echo "/dev/$(basename "$(readlink -f "/sys/class/block/$name/..")")"
}

# Candidate disks for a fresh device: every disk but the recovery medium.
list_disks() {
    medium_disk=$(cat /run/avobuild/medium-disk 2>/dev/null)
    for entry in /sys/block/*; do
        name=${entry##*/}
        case "$name" in loop*|ram*|sr*|zram*) continue ;; esac
        [ "/dev/$name" = "$medium_disk" ] && continue
        sectors=$(cat "$entry/size")
        is_number "$sectors" || continue
        echo "/dev/$name $((sectors / 2048)) MiB"
    done
}

find_medium() {
    mkdir -p "$MEDIUM" /run/avobuild
    attempt=0
    while [ "$attempt" -lt 20 ]; do
        for entry in /sys/class/block/*; do
            name=${entry##*/}
            case "$name" in loop*|ram*|zram*) continue ;; esac
            if mount -t iso9660 -o ro "/dev/$name" "$MEDIUM" 2>/dev/null; then
                if [ "$(cat "$MEDIUM/avobuild/medium-id" 2>/dev/null)" = "$AVO_MEDIUM_ID" ]; then
                    disk=$name
                    [ -e "$entry/partition" ] && disk=$(basename "$(readlink -f "$entry/..")")
                    echo "/dev/$disk" > /run/avobuild/medium-disk
                    say "recovery medium found on /dev/$name"
                    return 0
                fi
                umount "$MEDIUM"
            fi
        done
        attempt=$((attempt + 1))
        sleep 1
    done
    say "recovery medium not found (images on it are unavailable)"
    return 1
}

# --- network recovery ------------------------------------------------------------------------

# The value of key $2 in section [$1] of network-recovery.conf.
netconf() {
    [ -f "$NETCONF" ] || return 1
    awk -v section="[$1]" -v key="$2" '
        /^[ \t]*\[/ { gsub(/[ \t]/, ""); current = $0; next }
        current == section && index($0, "=") {
            name = substr($0, 1, index($0, "=") - 1); gsub(/[ \t]/, "", name)
            value = substr($0, index($0, "=") + 1); gsub(/^[ \t]+|[ \t\r]+$/, "", value)
            if (name == key) { print value; exit }
        }' "$NETCONF"
}

network_up() {
    interface=$(netconf Network Interface)
    timeout=$(netconf Network Timeout)
    dhcp=$(netconf Network DHCP)
    ip link set lo up
    if [ -z "$interface" ] || [ ! -e "/sys/class/net/$interface" ]; then
        interface=''
        for entry in /sys/class/net/*; do
            [ -e "$entry" ] && [ "${entry##*/}" != lo ] || continue
            interface=${entry##*/}
            break
        done
    fi
    [ -n "$interface" ] || { say "no network interface"; return 1; }
    ip link set "$interface" up
    case "$dhcp" in
        no|No|false|0) say "DHCP disabled in $NETCONF; configure $interface from the shell" ;;
        *)
            udhcpc -i "$interface" -n -q -t "${timeout:-30}" -T 1 \
                -s /usr/share/udhcpc/default.script >/dev/null 2>&1 \
                || { say "no DHCP answer on $interface"; return 1; }
            ;;
    esac
    address=$(ip -4 -o addr show dev "$interface" | awk '{ print $4 }')
    echo "$interface $address" > /run/avobuild/network
    say "network: $interface $address"
}

# Fetch URL $1 into file $2. https uses the device certificate when one is configured.
fetch() {
    url=$1
    output=$2
    method=$(netconf Authentication Method)
    case "$url" in
        https://*)
            if [ "$method" = certificate ] && command -v openssl >/dev/null; then
                fetch_tls "$url" "$output"
                return
            fi
            ;;
    esac
    wget -q -O "$output" "$url"
}

# HTTP/1.0 GET over `openssl s_client` with the device certificate and key, checking the
# server against the configured CA certificate.
fetch_tls() {
    rest=${1#https://}
    hostport=${rest%%/*}
    path=/${rest#*/}
    [ "$rest" = "$hostport" ] && path=/
    case "$hostport" in *:*) ;; *) hostport=$hostport:443 ;; esac
    host=${hostport%:*}
    raw=$2.response
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$host" \
        | openssl s_client -quiet -connect "$hostport" -servername "$host" \
            -CAfile "$(netconf Server Certificate)" -verify_return_error \
            -cert "$(netconf Authentication DeviceCert)" \
            -key "$(netconf Authentication DeviceKey)" > "$raw" 2>/dev/null || return 1
    head -n 1 "$raw" | grep -q ' 200 ' || { rm -f "$raw"; return 1; }
    header_bytes=$(awk '{ total += length($0) + 1 } /^\r?$/ { print total; exit }' "$raw")
    is_number "$header_bytes" || { rm -f "$raw"; return 1; }
    tail -c +"$((header_bytes + 1))" "$raw" > "$2"
    rm -f "$raw"
}

# --- images ----------------------------------------------------------------------------------

# Where the factory image is: on the medium, or downloaded from the recovery server.
factory_image() {
    if [ -f "$MEDIUM/avobuild/$AVO_FACTORY_IMAGE" ]; then
        echo "$MEDIUM/avobuild/$AVO_FACTORY_IMAGE"
        return 0
    fi
    server=${AVO_SERVER:-$(netconf Server URL)}
    if [ -n "$server" ] && [ -f /run/avobuild/network ]; then
        say "downloading $server/$AVO_FACTORY_IMAGE" >&2
        fetch "$server/$AVO_FACTORY_IMAGE" "/tmp/$AVO_FACTORY_IMAGE" \
            && fetch "$server/$AVO_FACTORY_IMAGE.sha256" "/tmp/$AVO_FACTORY_IMAGE.sha256" \
            && echo "/tmp/$AVO_FACTORY_IMAGE" && return 0
    fi
    return 1
}

# Check the image against its .sha256 (the hash of the uncompressed disk image).
verify_image() {
    expected=$(cut -d ' ' -f 1 "$1.sha256" 2>/dev/null)
    [ -n "$expected" ] || { fail "$1.sha256 is missing"; return 1; }
    say "verifying $1"
    actual=$(gunzip -c "$1" | sha256sum | cut -d ' ' -f 1)
    [ "$actual" = "$expected" ] || { fail "$1 is damaged (sha256 $actual, expected $expected)"; return 1; }
}

confirm() {
    [ "${ASSUME_YES:-0}" = 1 ] && return 0
    printf '%s Type "yes" to continue: ' "$1"
    read -r answer
    [ "$answer" = yes ]
}

with_lock() {
    mkdir -p /run/avobuild
    mkdir "$LOCK" 2>/dev/null || { fail "another recovery action is running"; return 1; }
    "$@"
    status=$?
    rmdir "$LOCK"
    return $status
}

# --- actions ---------------------------------------------------------------------------------

do_restore() {
    if ! image=$(factory_image); then
        bundle="$MEDIUM/avobuild/$AVO_BUNDLE"
        if [ -n "$AVO_BUNDLE" ] && [ -f "$bundle" ] && [ -x "$APPLIER" ]; then
            say "no factory image; installing $bundle with $APPLIER"
            "$APPLIER" apply --target inactive "$bundle"
            return
        fi
        fail "no factory image on the medium or the recovery server"
        return 1
    fi
    verify_image "$image" || return 1
    disk=$(device_disk)
    if [ -z "$disk" ]; then
        echo "No disk with an $AVO_PRODUCT layout was found. Disks:"
        list_disks
        printf 'Disk to write (e.g. /dev/sda): '
        read -r disk
    fi
    [ -b "$disk" ] || { fail "$disk is not a block device"; return 1; }
    sectors=$(cat "/sys/class/block/${disk##*/}/size" 2>/dev/null)
    is_number "$sectors" 18014398509481983 && is_number "$AVO_FACTORY_SIZE" && [ $((sectors * 512)) -ge "$AVO_FACTORY_SIZE" ] \
        || { fail "$disk is smaller than the $AVO_FACTORY_SIZE-byte factory image; nothing was written"; return 1; }
    confirm "Restore $AVO_PRODUCT $AVO_VERSION onto $disk: EVERYTHING on it is replaced." \
        || { say "cancelled"; return 1; }
    say "writing $image to $disk"
    gunzip -c "$image" | dd of="$disk" bs=1M conv=fsync 2>/dev/null || { fail "writing $disk failed"; return 1; }
    sync
    size=$AVO_FACTORY_SIZE
    written=$(head -c "$size" "$disk" | sha256sum | cut -d ' ' -f 1)
    expected=$(cut -d ' ' -f 1 "$image.sha256")
    [ "$written" = "$expected" ] || { fail "read-back of $disk does not match the image"; return 1; }
    say "factory image restored and verified; reboot to start $AVO_PRODUCT"
}

# Rewrite partition $1 (offset $2 and size $3 in AVO_BLOCK_SIZE blocks) from the factory image.
# The partition must be exactly where and as large as the layout says, so that the blocks
# written are the partition's own.
restore_partition() {
    image=$(factory_image) || { fail "no factory image to restore $1 from"; return 1; }
    verify_image "$image" || return 1
    partition_lookup "$1" || { fail "no partition named $1"; return 1; }
    device=$part_dev
    is_number "$AVO_BLOCK_SIZE" 1073741824 && is_number "$2" 1073741824 && is_number "$3" 1073741824 \
        && partition_geometry && [ "$part_start" = $(($2 * AVO_BLOCK_SIZE)) ] \
        && [ "$part_bytes" = $(($3 * AVO_BLOCK_SIZE)) ] \
        || { fail "$device ($1) is not where the layout puts it; nothing was written"; return 1; }
    say "rewriting $device ($1) from the factory image"
    gunzip -c "$image" | dd of="$device" bs="$AVO_BLOCK_SIZE" skip="$2" count="$3" conv=fsync 2>/dev/null
}

# Make a confirmed slot primary when the primary slot can no longer boot.
repair_bootstate() {
    esp=$(partition_device "$AVO_LABEL_BOOT") || { fail "no boot partition ($AVO_LABEL_BOOT)"; return 1; }
    mkdir -p /run/avobuild/boot
    mount -t vfat "$esp" /run/avobuild/boot || { fail "cannot mount $esp"; return 1; }
    env=/run/avobuild/boot/avobuild/grubenv
    if [ ! -f "$env" ]; then
        say "no boot state file on $esp"
    elif ! grubenv_read "$env" || ! is_name slot_name "${avo_primary:-A}"; then
        fail "$env is not a boot state this system can read; left as it is"
    else
        primary=${avo_primary:-A}
        other=B
        [ "$primary" = B ] && other=A
        if [ "$primary" = A ]; then
            ok=${avo_A_ok:-0} tries=${avo_A_tries:-0} other_ok=${avo_B_ok:-0}
        else
            ok=${avo_B_ok:-0} tries=${avo_B_tries:-0} other_ok=${avo_A_ok:-0}
        fi
        if [ "$ok" != 1 ] && [ "$tries" = 0 ] && [ "$other_ok" = 1 ]; then
            say "slot $primary is unconfirmed with no tries left; making slot $other primary"
            avo_primary=$other
            grubenv_write "$env" || fail "$env: cannot be written"
        else
            say "boot state: slot $primary primary (ok=$(clean "$ok"), tries=$(clean "$tries")); nothing to change"
        fi
    fi
    umount /run/avobuild/boot
}

check_filesystems() {
    status=0
    for label in $AVO_LABEL_BOOT $AVO_LABEL_SYSTEM_A $AVO_LABEL_SYSTEM_B $AVO_LABEL_DATA; do
        device=$(partition_device "$label") || { say "$label: partition not found"; status=1; continue; }
        if [ "$label" = "$AVO_LABEL_BOOT" ]; then
            command -v fsck.vfat >/dev/null && { fsck.vfat "$@" "$device" >/dev/null 2>&1 || status=1; }
        elif command -v e2fsck >/dev/null; then
            e2fsck "$@" "$device" >/dev/null 2>&1
            [ $? -le 1 ] || status=1
        fi
        say "$label ($device): checked"
    done
    return $status
}

do_repair() {
    say "checking filesystems"
    check_filesystems -p
    repair_bootstate
}

do_repair_boot() {
    esp=$(partition_device "$AVO_LABEL_BOOT") || { fail "no boot partition ($AVO_LABEL_BOOT)"; return 1; }
    if command -v fsck.vfat >/dev/null && fsck.vfat -a "$esp" >/dev/null 2>&1; then
        say "boot partition $esp is consistent"
        repair_bootstate
        return
    fi
    confirm "The boot partition $esp is damaged; rewrite it from the factory image." || return 1
    restore_partition "$AVO_LABEL_BOOT" "$AVO_BOOT_OFFSET_BLOCKS" "$AVO_BOOT_SIZE_BLOCKS"
}

do_reset_config() {
    device=$(partition_device "$AVO_LABEL_DATA") || { fail "no data partition ($AVO_LABEL_DATA)"; return 1; }
    confirm "Reset configuration: user data and settings on $device are erased." || return 1
    if factory_image >/dev/null; then
        restore_partition "$AVO_LABEL_DATA" "$AVO_DATA_OFFSET_BLOCKS" "$AVO_DATA_SIZE_BLOCKS"
    else
        say "no factory image: formatting $device empty"
        # By path: busybox runs its own applets before PATH, and its mke2fs only makes ext2.
        if [ -x /usr/sbin/mke2fs ]; then
            /usr/sbin/mke2fs -q -F -t ext4 -L "$AVO_LABEL_DATA" "$device"
        else
            mke2fs -F -L "$AVO_LABEL_DATA" "$device" >/dev/null
        fi
    fi
}

do_diagnose() {
    echo "== $AVO_PRODUCT $AVO_VERSION recovery ($AVO_MODE) =="
    echo "kernel: $(uname -r)"
    echo "cpu: $(grep -m 1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "memory: $(awk '/MemTotal/ { print int($2 / 1024) " MiB" }' /proc/meminfo)"
    echo "disks:"
    list_disks | sed 's/^/  /'
    echo "partitions:"
    for uevent in /sys/class/block/*/uevent; do
        name=$(sed -n 's/^PARTNAME=//p' "$uevent")
        [ -n "$name" ] && echo "  /dev/$(sed -n 's/^DEVNAME=//p' "$uevent") $name"
    done
    echo "network:"
    ip -4 -o addr show 2>/dev/null | awk '{ print "  " $2 " " $4 }'
    echo "filesystems (read-only check):"
    check_filesystems -n | sed 's/^/  /'
    if [ -x "$APPLIER" ]; then
        echo "applier status:"
        "$APPLIER" status 2>&1 | sed 's/^/  /'
    fi
    if command -v smartctl >/dev/null; then
        for entry in /sys/block/sd* /sys/block/nvme*; do
            [ -e "$entry" ] || continue
            echo "SMART /dev/${entry##*/}: $(smartctl -H "/dev/${entry##*/}" 2>&1 | grep -i 'result' || echo 'not available')"
        done
    fi
    if [ "${1:-}" = --full ]; then
        echo "kernel messages (errors):"
        dmesg | grep -i -E 'error|fail|i/o' | tail -n 20 | sed 's/^/  /'
        echo "modules:"
        lsmod | sed 's/^/  /'
    fi
    echo "== end of diagnostics =="
}

do_shell() {
    echo "Recovery shell: type 'exit' to return to the menu."
    sh -l
}

show_menu() {
    echo
    echo "Avocado OS Recovery - $AVO_PRODUCT $AVO_VERSION ($AVO_MODE)"
    [ -f /run/avobuild/network ] && echo "network: $(cat /run/avobuild/network)"
    echo "1. Restore factory image"
    echo "2. Repair boot partition"
    echo "3. Reset configuration"
    echo "4. Advanced diagnostics"
    echo "5. Automatic repair"
    echo "6. Shell"
    echo "7. Reboot"
}

menu() {
    while true; do
        show_menu
        printf 'Select option: '
        read -r option || sleep 5
        case "$option" in
            1) with_lock do_restore ;;
            2) with_lock do_repair_boot ;;
            3) with_lock do_reset_config ;;
            4) do_diagnose --full ;;
            5) with_lock do_repair ;;
            6) do_shell ;;
            7) sync; reboot -f ;;
            "") ;;
            *) echo "unknown option: $option" ;;
        esac
    done
}

[ "${2:-}" = --yes ] && ASSUME_YES=1
case "${1:-menu}" in
    menu) menu ;;
    shell) do_shell ;;
    repair) with_lock do_repair ;;
    restore|factory-restore) with_lock do_restore ;;
    repair-boot) with_lock do_repair_boot ;;
    reset-config) with_lock do_reset_config ;;
    diagnose) do_diagnose "${2:-}" ;;
    find-medium) find_medium ;;
    network-up) mkdir -p /run/avobuild; network_up ;;
    *) echo "usage: avocado-recovery [menu|shell|repair|restore|repair-boot|reset-config|diagnose [--full]]" >&2; exit 2 ;;
esac
