"""Which partition of a disk an update writes: one resolution for full and delta installs."""

from __future__ import annotations

from avobuild.errors import InstallError
from avobuild.model.layout import Layout, Role


def role_label(layout: Layout | None, role: Role) -> str:
    """The partition label of `role`: from the layout, or by convention the role's name."""
    if layout is not None:
        spec = layout.by_role(role)
        if spec is None:
            raise InstallError(f"{layout.path}: no partition has role {role.value!r}")
        return spec.label
    return role.value
