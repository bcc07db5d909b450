"""Boot selection state shared by the installer, the bootloader scripts and the applier.

`grubenv` and `uboot` encode the two environment formats, `state` the slot variables kept in
them, `trial` the trial-boot decision the bootloader scripts make, `bootfiles` the boot loader
binaries taken from Debian packages (GRUB EFI images, ISOLINUX, iPXE).
"""
