# --- avocado-update: the verbs by name (applier/shell/main.sh) ----------------------------------
main() {
    [ $# -ge 1 ] || usage "avocado-update VERB [OPTIONS] (verbs: check download agent verify apply commit confirm status rollback verify-partition check-compatibility backup pre-check validate simulate history report monitor health-check boot)"
    verb=$1
    shift
    mkdir -p "$WORK" || die 1 "$WORK: cannot create a work directory"
    case $verb in
    check) cmd_check "$@" ;;
    download) cmd_download "$@" ;;
    agent) cmd_agent "$@" ;;
    verify) cmd_verify "$@" ;;
    apply | apply-delta) cmd_apply "$@" ;;
    commit) cmd_commit "$@" ;;
    confirm) cmd_confirm "$@" ;;
    status) cmd_status "$@" ;;
    rollback) cmd_rollback "$@" ;;
    verify-partition) cmd_verify_partition "$@" ;;
    check-compatibility) cmd_check_compatibility "$@" ;;
    backup) cmd_backup "$@" ;;
    pre-check) cmd_pre_check "$@" ;;
    validate) cmd_validate "$@" ;;
    simulate) cmd_simulate "$@" ;;
    history) cmd_history "$@" ;;
    report) cmd_report "$@" ;;
    monitor) cmd_monitor "$@" ;;
    health-check) cmd_health_check "$@" ;;
    boot) cmd_boot "$@" ;;
    help | -h | --help) if [ $# -ge 1 ]; then verb_help "$1"; else verbs_help; fi ;;
    *) usage "unknown verb '$verb' (avocado-update help: the verbs)" ;;
    esac
}

main "$@"
