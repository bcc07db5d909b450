# avobuild: `make demo` builds the demo product into ./out; `make test` runs the whole suite.
# Both start by installing what they need (Debian host tools, a Python venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out
DEMO_RECIPE := recipes/demo.toml
KEYRING := keys-example/insecure-example.pub.pem
export SOURCE_DATE_EPOCH ?= 1767225600

.PHONY: all setup host-tools venv demo test lint clean

all: demo

host-tools:
	./scripts/setup-host

$(BIN)/avobuild: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/avobuild

# Debian's kernel and its modules, extracted from the linux-image package (no install).
KERNEL := build/debian/modules/.complete
$(KERNEL):
	./scripts/fetch-kernel build/debian amd64

# The arm64 demo device (recipes/demo-arm64.toml): Debian's arm64 kernel, and the arm64
# binaries it needs on the target (busybox, openssl, zstd, fw_printenv/fw_setenv with their
# libraries) unpacked from Debian's arm64 packages into a sysroot; nothing is installed.
ARM64 := build/debian-arm64
# bsdiff and xz-utils: bspatch and xz apply the executable-aware deltas (stream version 2).
ARM64_PACKAGES := busybox-static openssl zstd libubootenv-tool bsdiff xz-utils
KERNEL_ARM64 := $(ARM64)/modules/.complete
SYSROOT_ARM64 := $(ARM64)/sysroot/.complete
$(KERNEL_ARM64):
	./scripts/fetch-kernel $(ARM64) arm64
$(SYSROOT_ARM64):
	./scripts/fetch-sysroot $(ARM64) arm64 $(ARM64_PACKAGES)

setup: host-tools venv $(KERNEL) $(KERNEL_ARM64) $(SYSROOT_ARM64)

AVOBUILD := $(BIN)/avobuild
DEMO_V2 := recipes/demo-v2.toml
DEMO_KEY := keys-example/insecure-example.key.pem
V1 := $(OUT)/avobuild-demo-1.0.0
V2 := $(OUT)/avobuild-demo-1.1.0

# The demo end to end: applier, recovery system, factory image (with the recovery partition),
# full bundles of 1.0.0 and 1.1.0, the delta between them, USB recovery media, a PXE tree.
demo: setup
	$(AVOBUILD) applier render $(DEMO_RECIPE) -o $(OUT)/applier
	$(AVOBUILD) recovery build $(DEMO_RECIPE) --applier $(OUT)/applier/usr/sbin/avocado-update \
		-o $(OUT)/recovery.img
	$(AVOBUILD) image $(DEMO_RECIPE) --recovery $(OUT)/recovery.img -o $(OUT)
	$(AVOBUILD) bundle create $(DEMO_RECIPE) -o $(V1).avb
	$(AVOBUILD) bundle create $(DEMO_V2) -o $(V2).avb
	$(AVOBUILD) bundle verify $(V2).avb --keyring $(KEYRING)
	$(AVOBUILD) delta create --from $(V1).avb --to $(V2).avb --key $(DEMO_KEY) \
		--keyring $(KEYRING) -o $(OUT)/avobuild-demo-1.0.0-to-1.1.0.avb
	$(AVOBUILD) delta stats --from $(V1).avb --to $(V2).avb
	$(AVOBUILD) media usb $(DEMO_RECIPE) --factory-image $(V1).img \
		--applier $(OUT)/applier/usr/sbin/avocado-update -o $(OUT)/avobuild-demo-recovery-usb.iso
	# 10.0.2.2 is the host as QEMU's user-mode network shows it (the demo's PXE boot).
	$(AVOBUILD) media pxe $(DEMO_RECIPE) --server 10.0.2.2 --factory-image $(V1).img \
		--applier $(OUT)/applier/usr/sbin/avocado-update -o $(OUT)/pxe
	@echo "demo outputs in $(OUT)/:"; ls -1 $(OUT)

# The arm64 demo device: its factory image and the bundles of 1.0.0.
DEMO_ARM64 := recipes/demo-arm64.toml
ARM64_V1 := $(OUT)/avobuild-demo-arm64-1.0.0
.PHONY: demo-arm64
demo-arm64: setup
	$(AVOBUILD) image $(DEMO_ARM64) -o $(OUT)
	$(AVOBUILD) bundle create $(DEMO_ARM64) -o $(ARM64_V1).avb

# Boot the demo factory image in QEMU (software emulation) and stay at the device's serial
# console: ARCH=x86_64 (default) with UEFI firmware OVMF, ARCH=arm64 on QEMU's virt board
# with Debian's U-Boot as its firmware. snapshot=on keeps a copy-on-write overlay: the image
# in $(OUT) is never written. Leave QEMU with Ctrl-A X (docs/demo-device.md).
.PHONY: demo-boot
ARCH ?= x86_64
OVMF_CODE := /usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS := /usr/share/OVMF/OVMF_VARS_4M.fd
UBOOT_QEMU_ARM64 := /usr/lib/u-boot/qemu_arm64/u-boot.bin
ifeq ($(ARCH),arm64)
demo-boot:
	@test -f $(ARM64_V1).img || { echo "$(ARM64_V1).img missing: run 'make demo-arm64' first"; exit 1; }
	qemu-system-aarch64 -machine virt -cpu cortex-a57 -m 512 -nographic -serial mon:stdio \
		-nic none -bios $(UBOOT_QEMU_ARM64) \
		-drive file=$(ARM64_V1).img,format=raw,if=none,id=disk,snapshot=on \
		-device virtio-blk-pci,drive=disk
else
demo-boot:
	@test -f $(V1).img || { echo "$(V1).img missing: run 'make demo' first"; exit 1; }
	cp $(OVMF_VARS) $(OUT)/demo-boot-vars.fd
	qemu-system-x86_64 -accel tcg -m 512 -nographic -serial mon:stdio -net none \
		-drive if=pflash,format=raw,readonly=on,file=$(OVMF_CODE) \
		-drive if=pflash,format=raw,file=$(OUT)/demo-boot-vars.fd \
		-drive file=$(V1).img,format=raw,if=virtio,snapshot=on
endif

# The lifecycle test on its own (docs/demo-device.md): updates, rollbacks, a kernel panic and
# USB recovery of the demo device in QEMU (ARCH=arm64: the U-Boot device's updates and panic
# fallback). Watch it with
#   tail -f build/lifecycle/test_device_lifecycle0/console.log
#   tail -f build/lifecycle-arm64/test_arm64_uboot_device_lif0/console.log
.PHONY: demo-lifecycle
ifeq ($(ARCH),arm64)
demo-lifecycle: setup
	$(BIN)/pytest -s -p no:cacheprovider tests/test_device_arm64.py --basetemp build/lifecycle-arm64
else
demo-lifecycle: setup
	$(BIN)/pytest -s -p no:cacheprovider tests/test_device_lifecycle.py --basetemp build/lifecycle
endif

lint: venv
	$(BIN)/ruff check avobuild tests
	$(BIN)/ruff format --check avobuild tests
	$(BIN)/mypy --strict avobuild

test: setup
	$(BIN)/pytest -q -n auto --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(OUT) build/debian $(ARM64) .pytest_cache .mypy_cache .ruff_cache
