# The one entry point for developers and CI: `make test` brings a fresh Debian machine from
# nothing to a full run (venv, Debian packages for the real servers, lint, types, tests).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful `pip install -e .[dev]`; newer than pyproject.toml means up to date.
STAMP := $(VENV)/.dev-installed

# The real parts the tests run (docs/design.md, "Tests: real parts") and one binary proving
# each package is there.
DEB_PACKAGES := nginx-light mosquitto libubootenv-tool mtools dosfstools e2fsprogs curl util-linux fdisk udev u-boot-tools zstd shellcheck \
	dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools fakeroot lintian mmdebstrap systemd \
	qemu-system-x86 u-boot-qemu
DEB_BINARIES := nginx mosquitto fw_printenv mcopy mkfs.vfat mkfs.ext4 curl losetup sfdisk udevadm mkimage zstd shellcheck \
	dpkg-buildpackage dh dh_python3 pyproject-build fakeroot lintian mmdebstrap systemd-analyze qemu-system-x86_64
# Packages that bring no command: one file each proves them there.
DEB_FILES := /usr/lib/u-boot/qemu-x86/u-boot.rom

.PHONY: test test-paho16 system-test lint bench demo deps clean distclean

test: deps lint
	$(BIN)/pytest -q
	$(MAKE) test-paho16

# The agent against Debian 12's paho-mqtt 1.6.1 too (Debian 13 and PyPI have 2.x).
PAHO16 := .venv-paho16
test-paho16: $(PAHO16)/.installed
	$(PAHO16)/bin/python -m pytest -q -p no:cacheprovider tests/test_agent.py

# Like $(STAMP): installed again whenever pyproject.toml (the dependencies) changes.
$(PAHO16)/.installed: pyproject.toml
	@test -x $(PAHO16)/bin/python || $(PYTHON) -m venv $(PAHO16)
	$(PAHO16)/bin/python -m pip install --quiet -e '.[dev]' 'paho-mqtt==1.6.1'
	touch $@

# The whole system in a virtual machine (tests/system): the A/B image with U-Boot, systemd and
# the built package, real reboots, four scenarios. Minutes, not seconds; CI runs it after `test`.
system-test: deps $(STAMP)
	$(BIN)/pytest -q -x -p no:cacheprovider --durations=0 --system tests/system

lint: $(STAMP)
	$(BIN)/ruff check updater tests
	$(BIN)/mypy
	shellcheck -x image-recipes/*.sh image-recipes/hooks/* hooks/*/*

bench: deps $(STAMP)
	$(BIN)/python -m tests.bench

demo: deps $(STAMP)
	$(BIN)/python -m tests.demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Only as root and only when a binary is missing; `apt-get update` only if the install fails
# (a fresh machine's package lists may be stale or empty). A temporary policy-rc.d keeps the
# packages from starting system services: the tests start their own private servers.
deps:
	@missing=""; \
	for bin in $(DEB_BINARIES); do \
	    PATH="$$PATH:/usr/sbin:/sbin" command -v "$$bin" >/dev/null || missing="$$missing $$bin"; \
	done; \
	for file in $(DEB_FILES); do test -e "$$file" || missing="$$missing $$file"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	    echo "missing:$$missing (not root: not installing; the tests needing them will skip)"; \
	    exit 0; \
	fi; \
	echo "missing:$$missing; installing $(DEB_PACKAGES)"; \
	export DEBIAN_FRONTEND=noninteractive; \
	policy=/usr/sbin/policy-rc.d; own_policy=""; \
	if [ ! -e "$$policy" ]; then \
	    printf '#!/bin/sh\nexit 101\n' >"$$policy"; chmod 755 "$$policy"; own_policy=1; \
	fi; \
	apt_install() { apt-get install -y --no-install-recommends $(DEB_PACKAGES); }; \
	status=0; apt_install || { apt-get update && apt_install; } || status=$$?; \
	if [ -n "$$own_policy" ]; then rm -f "$$policy"; fi; \
	exit $$status

# The Debian package (debian/), built from a clean copy of the work tree: the files git tracks
# and the new ones it does not ignore, so never .venv, caches or earlier builds. Source and
# binary packages land in $(DIST); lintian must find no error and no warning. Debian's own
# tools and python3 only: no venv, pyenv or PYTHON* variables of the developer's shell.
DIST ?= dist
DEB_ENV := env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME -u PYTHONSTARTUP -u PYTHONUSERBASE \
	PATH=/usr/sbin:/usr/bin:/sbin:/bin
.PHONY: package
package: deps
	@version=$$(dpkg-parsechangelog -S Version); \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	src="$$tmp/rpi-ab-updater-$$version"; mkdir "$$src"; \
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	    git ls-files -z --cached --others --exclude-standard -- . ':!:dist' \
	        | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$$src"; \
	else \
	    tar --exclude-vcs --exclude=./.venv\* --exclude=./dist --exclude=./build \
	        --exclude='*.egg-info' --exclude=__pycache__ --exclude='./.*_cache' \
	        --exclude=./.hypothesis -cf - . | tar -xf - -C "$$src"; \
	fi; \
	(cd "$$src" && $(DEB_ENV) dpkg-buildpackage -us -uc); \
	mkdir -p "$(DIST)"; \
	cp "$$tmp"/rpi-ab-updater_"$$version"{_all.deb,.dsc,.tar.xz,_*.buildinfo,_*.changes} "$(DIST)/"; \
	$(DEB_ENV) lintian --info --display-info --fail-on error,warning "$(DIST)/rpi-ab-updater_$${version}_"*.changes; \
	ls -l "$(DIST)"/rpi-ab-updater_"$$version"*

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info $(STAMP)
	find updater tests -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(PAHO16)
