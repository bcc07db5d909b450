"""The bootable device: what a factory image needs to boot on real hardware or in QEMU."""
