"""Recovery systems and the media that carry them.

`initramfs` writes reproducible newc cpio archives, `elfdeps` finds the shared libraries a
host binary needs, `kmod` picks kernel modules with their dependencies, `recovery` assembles
the recovery system (kernel + initramfs) and its partition image, `usb` the hybrid ISO for
USB sticks and `pxe` the TFTP tree for network recovery.
"""
