"""avobuild: host-side toolchain for A/B updates of embedded Linux devices."""

__version__ = "0.1.0"
