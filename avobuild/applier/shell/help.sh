# --- avocado-update: usage of every verb (applier/shell/help.sh) ------------------------------
# `avocado-update help` (or -h, --help) lists the verbs; `avocado-update VERB --help` shows one.
# Both write to standard output and exit 0, as git and RAUC do; a wrong command line still
# ends with exit code 2 and the usage on standard error.

# verb_table: one "VERB^ARGUMENTS^WHAT IT DOES" line per verb (docs/applier.md, "Verbs").
verb_table() {
    cat << 'VERBS'
check^^ask the fleet server (or the static index) whether an update is offered; the index is verified first
download^(--url URL | --version V) [-o FILE]^fetch a bundle: by URL (wget -c), or the delta or full bundle of V through the verified index (resumed)
agent^[--once]^the update agent: check, download, apply and report on CheckInterval within the UpdateWindow
verify^--bundle FILE|-^signature, manifest, every chunk; writes nothing (off the device too)
validate^--bundle FILE^verify, then the compatible string and each image's partition size
simulate^--bundle FILE^everything but the writes; prints the plan
apply^--target inactive [--bundle FILE | -]^verify, then write the inactive slot (from a file or a pipe)
commit^^make the applied slot boot next, with max_attempts tries
confirm^^mark the running (primary) slot good
status^^current and previous version and partition, state
rollback^[--force] [--now] [--preserve-data] [--backup-current] [--test] [--verbose]^boot the other slot
verify-partition^--partition active|inactive|A|B^hash a slot against the version it holds
check-compatibility^--from current --to previous^whether the other slot's system fits this device
backup^--include PATH ... --output FILE.tar^archive paths of the running system
pre-check^^disk space, battery/AC, network, critical services
history^[--verbose]^the update history
report^--format json [--from YYYY-MM-DD] [--to YYYY-MM-DD]^the history as JSON
monitor^[--follow]^the state, and with --follow every change
health-check^[--no-reboot]^run by the unit or init script after boot; confirms or rolls back
boot^^boot hook: reconcile the state with the booted slot
help^[VERB]^this list, or one verb's usage
VERBS
}

verbs_help() {
    echo "usage: avocado-update VERB [OPTIONS]   (avocado-update VERB --help: one verb)"
    echo
    echo "verbs:"
    verb_table | while IFS='^' read -r _vh_verb _vh_args _vh_what; do
        printf '  %-20s %s\n' "$_vh_verb" "$_vh_what"
    done
    echo
    echo "exit codes: 0 success, 1 failure, 2 usage, 3 bundle refused, 4 incompatible, 5 not now"
}

# verb_help VERB: the usage line and description of VERB.
verb_help() {
    _vh_line=$(verb_table | awk -F'^' -v verb="$1" '$1 == verb' | head -n 1)
    if [ -z "$_vh_line" ]; then
        echo "usage: avocado-update $1 [OPTIONS]"
        return
    fi
    _vh_what=${_vh_line##*^}
    _vh_args=${_vh_line#*^}
    _vh_args=${_vh_args%^*}
    echo "usage: avocado-update $1${_vh_args:+ $_vh_args}"
    echo
    echo "  $_vh_what"
}
