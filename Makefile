# Stockade: `make run` and `make test` set up everything they need on a fresh Debian 12
# machine (as root), idempotently, then run.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCE ?= examples
# examples/ puts its pods on node "demo"; set NODE (and SOURCE) for your own manifests.
NODE ?= demo
# Debian packages: nftables and its Python bindings (nftables dataplane), bcc and headers
# (eBPF dataplane), iproute2 (namespace lab, tc), conntrack (strict mode), iperf3 (bench),
# prometheus (server and promtool for the metrics tests), python3-systemd (sd_notify),
# python3-seccomp (libseccomp bindings: the tests run the agent under the systemd unit's
# system-call filter, tests/kit/sandbox.py), python3-dnspython (DNS answers for domainNames),
# dnsmasq-base (the dnsmasq binary alone, a real DNS server in the DNS-egress lab; never the
# `dnsmasq` package, which starts a system service on the host's port 53).
APT_PACKAGES := nftables python3-nftables python3-bpfcc bpfcc-tools linux-headers-amd64 \
	iproute2 conntrack iperf3 prometheus python3-systemd systemd python3-venv python3-seccomp \
	python3-dnspython dnsmasq-base
# The container image (`make image`, also built by the image test in `make test`): mmdebstrap
# makes the Debian base without a registry, buildah builds deploy/Containerfile on it, podman
# (with crun) runs it.
IMAGE_PACKAGES := mmdebstrap buildah podman crun
KREL := $(shell uname -r)

.PHONY: setup system image-tools image kernel-headers venv run test lint demo bench bench-reliability cleanup clean

setup: system venv

# Install the Debian packages in $(1) that are missing.
define apt_install
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

system:
	$(call apt_install,$(APT_PACKAGES))
	@$(MAKE) -s kernel-headers

image-tools:
	$(call apt_install,$(IMAGE_PACKAGES))

# localhost/stockade:<inputs hash> and :<version>; the base tarball is cached under
# /var/cache/stockade-image. BASE=<registry image> builds FROM that instead of mmdebstrap's.
image: image-tools venv
	BASE=$(BASE) deploy/image/build.sh

# bcc needs /lib/modules/$(uname -r)/{build,source}; the running kernel has no headers
# package, so point them at Debian's generic ones (uapi headers are all tc programs use).
kernel-headers:
	@if [ ! -e /lib/modules/$(KREL)/build/include/linux/kconfig.h ] && \
	    [ ! -e /lib/modules/$(KREL)/source/include/linux/kconfig.h ]; then \
		hdr=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1); \
		common=$$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1); \
		if [ -z "$$hdr" ] || [ -z "$$common" ]; then echo "linux-headers-amd64 missing" >&2; exit 1; fi; \
		mkdir -p /lib/modules/$(KREL); \
		ln -sfn $$hdr /lib/modules/$(KREL)/build; \
		ln -sfn $$common /lib/modules/$(KREL)/source; \
		echo "linked kernel headers for bcc: $$hdr, $$common"; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(VENV)/bin/stockade run --source $(SOURCE) --node $(NODE)

test: setup image-tools
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/lint-imports --no-cache  # the layering contracts in pyproject.toml
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: venv
	$(VENV)/bin/ruff check agent tests bench

# The examples' matrix next to real probes, then `explain` for each ClusterNetworkPolicy
# rule that decides a flow; DATAPLANE=ebpf for the eBPF dataplane.
DATAPLANE ?= nftables
demo: setup
	$(PY) -m tests.kit.demo examples $(DATAPLANE)

# Benchmarks print a table and write bench/results/<time>.json; they never pass or fail.
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

bench-reliability: setup
	$(PY) -m bench.reliability $(BENCH_ARGS)

cleanup: venv
	$(VENV)/bin/stockade cleanup

clean:
	rm -rf $(VENV) build *.egg-info
