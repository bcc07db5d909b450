"""The on-target applier: recipe configuration, rendering and its templates."""
