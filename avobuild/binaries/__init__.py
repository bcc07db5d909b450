"""Executables and kernel modules: ELF architecture checks, shared-library closure, modules.

`elf` checks binaries and kernel images against the recipe's architecture (pyelftools),
`elfdeps` finds the shared libraries a host binary needs, `kmod` picks kernel modules with
their dependencies from `.modinfo`.
"""
