"""`avobuild install` and `avobuild status`: bundles into disk images, boot state."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from avobuild.cli.common import JsonOption, app, emit, out, step_progress
from avobuild.cli.output import console


@app.command()
def install(
    bundle: Annotated[Path, typer.Argument(help="The .avb bundle, or - for standard input.")],
    disk: Annotated[Path, typer.Option(help="Factory disk image to install into.")],
    keyring: Annotated[
        Path,
        typer.Option(help="Keyring: PEM keys/certificates, a directory of them, or a .toml file."),
    ],
    layout: Annotated[
        Path | None,
        typer.Option(help="Layout TOML, for a disk avobuild did not make (else its record)."),
    ] = None,
    confirm: Annotated[
        bool, typer.Option("--confirm", help="Mark the new slot good at once (preloading).")
    ] = False,
    decryption_key: Annotated[
        Path | None,
        typer.Option(help="For an encrypted payload: a recipient's private key, or the key file."),
    ] = None,
    allow_downgrade: Annotated[
        bool,
        typer.Option("--allow-downgrade", help="Install a version older than the running slot's."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Verify a bundle fully, write it to the inactive slot and make that slot boot next.

    From a file, every chunk and delta operation is checked before the first write. From
    standard input (-) the bundle is read once: the inactive slot is marked incomplete, each
    verified chunk is written as it arrives, and the slots switch only after the whole bundle
    verified. The only confirmed slot is never written; an older version than the running
    one needs --allow-downgrade. An install that was cut short resumes where it stopped
    (DISK.avobuild-resume records it), after checking what it had written.
    """
    from avobuild.bundle.crypt import load_decryption_key
    from avobuild.model.layout import load_layout
    from avobuild.update.install import install_bundle

    decryption = load_decryption_key(decryption_key) if decryption_key is not None else None
    loaded_layout = load_layout(layout) if layout is not None else None
    with step_progress() as update:

        def report(step: str, done: int, total: int) -> None:
            # A resumed install says where it resumes, once, whatever the progress display.
            if step.startswith("resuming at chunk"):
                console.print(step)
            else:
                update(step, done, total)

        stream = sys.stdin.buffer if str(bundle) == "-" else None
        result = install_bundle(
            Path("<stdin>") if stream is not None else bundle,
            disk,
            keyring,
            layout=loaded_layout,
            confirm=confirm,
            progress=report,
            stream=stream,
            decryption=decryption,
            allow_downgrade=allow_downgrade,
        )
    if result.resume_refused is not None:
        console.print(result.resume_refused)
    if as_json:
        document = {
            "disk": str(disk),
            "version": result.version,
            "slot": result.slot.value,
            "previous": result.previous.value,
            "confirmed": confirm,
            "written": result.written,
            "resumed": result.resumed,
        }
        emit(True, document)
        return
    state = "confirmed" if confirm else "pending trial boot"
    out.print(
        f"installed {result.version} into slot {result.slot.value} "
        f"(previous: {result.previous.value}), {state}"
    )


@app.command()
def status(
    disk: Annotated[Path, typer.Option(help="Disk image to read the boot state from.")],
    layout: Annotated[
        Path | None,
        typer.Option(help="Layout TOML, for a disk avobuild did not make (else its record)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show which slot boots next, what each slot holds and whether it is confirmed."""
    from avobuild.model.layout import load_layout
    from avobuild.update.install import read_boot_state

    state = read_boot_state(disk, load_layout(layout) if layout is not None else None)
    report = {
        "primary": state.primary.value,
        "compatible": state.compatible,
        "security_version": state.security_version,
        "slots": {
            slot.value: {
                "ok": s.ok,
                "tries": s.tries,
                "version": s.version,
                "security_version": s.security_version,
                "incomplete": s.incomplete,
            }
            for slot, s in state.slots.items()
        },
    }
    if as_json:
        out.print(json.dumps(report, indent=2, sort_keys=True))
        return
    out.print(f"compatible: {state.compatible}")
    if state.security_version:
        out.print(f"security version: {state.security_version} (anti-rollback floor)")
    for slot, slot_state in state.slots.items():
        marker = "*" if slot is state.primary else " "
        if slot_state.incomplete:
            out.print(
                f"{marker} slot {slot.value}: (incomplete: an install into it has not finished; "
                "it does not boot)"
            )
            continue
        condition = "confirmed" if slot_state.ok else f"unconfirmed, {slot_state.tries} tries left"
        out.print(f"{marker} slot {slot.value}: {slot_state.version or '(empty)'} ({condition})")
