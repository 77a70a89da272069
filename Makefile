# liveclone — build and test entry points.
#
#   make test       lint, host tests, the real-kernel tests in the VM, then the
#                   tests against a real kube-apiserver (the README's test
#                   command; what .ci/run calls)
#   make test-unit  host tests only (no root, no device-mapper)
#   make test-k8s   tests against etcd + kube-apiserver on loopback (CRDs,
#                   status subresource, printer columns, RBAC); builds the
#                   Kubernetes tools from the Go module proxy once (cached)
#   make test-vm    real-kernel tests in a QEMU VM whose kernel has dm-clone
#                   (LIVECLONE_TEST_ON_HOST=1: on this host instead, as root,
#                   if its kernel has dm-clone)
#   make vm-prepare install QEMU and build the VM kernel bits (cached)
#   make tools      build the pinned Go test tools, e.g. csi-sanity (cached)
#   make deps       install the system packages the build needs (libdevmapper, libclang)
#   make vm-shell   boot the test VM and run CMD (default: a short report)
#   make demo-vm    the live-clone story on a real kernel, no cluster needed
#   make bench      benchmarks in the VM, as ratios to same-run baselines (docs/BENCHMARKS.md)
#   make crds       regenerate the CRD YAML in deploy/crds and charts/liveclone/crds

CARGO ?= cargo
VMTEST := target/debug/vmtest
VM_TIMEOUT ?= 3000
CMD ?= sh -c 'uname -a; dmsetup targets; lsblk'

.PHONY: test test-unit test-vm test-k8s k8s-tools lint vm-prepare vm-shell build demo-vm tools bench deps

test: lint test-unit test-vm test-k8s

deps:
	bash tests/tools/install-build-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --features vmtest/real-kernel,vmtest/vm,liveclone/real-kernel,liveclone/vm,liveclone/k8s,kubetest/k8s -- -D warnings

test-unit: deps
	$(CARGO) test --workspace

vm-prepare:
	bash tests/vm/prepare.sh

tools:
	bash tests/tools/build-go-tools.sh

k8s-tools:
	bash tests/tools/build-k8s-tools.sh

test-k8s: deps k8s-tools
	$(CARGO) test -p kubetest -p liveclone --features kubetest/k8s,liveclone/k8s --test 'k8s_*'

$(VMTEST): FORCE deps
	$(CARGO) build -p vmtest

test-vm: $(VMTEST) tools k8s-tools
ifneq ($(LIVECLONE_TEST_ON_HOST),1)
	bash tests/vm/prepare.sh
endif
	$(VMTEST) test --timeout $(VM_TIMEOUT) --test-arg=--test-threads=1 \
		-- --workspace --features vmtest/real-kernel,liveclone/real-kernel --test 'real_*'
ifeq ($(LIVECLONE_TEST_ON_HOST),1)
	@echo "vm_* tests (power cuts) need the VM; skipped on the host"
else
	$(CARGO) test -p vmtest --features vm --test vm_power_cut -- --test-threads=1
	$(CARGO) test -p liveclone --features vm --test vm_driver_power_cut -- --test-threads=1
endif

demo-vm: $(VMTEST)
	bash tests/vm/prepare.sh
	$(CARGO) build -p liveclone --bin liveclone --example csi
	$(VMTEST) run -- bash tests/vm/demo.sh

bench: $(VMTEST)
	bash tests/vm/prepare.sh
	$(VMTEST) test --timeout 3000 --memory 2048 \
		--test-arg=--ignored --test-arg=--nocapture --test-arg=--test-threads=1 \
		-- -p liveclone --features real-kernel --test bench_driver

vm-shell: $(VMTEST)
	bash tests/vm/prepare.sh
	$(VMTEST) run -- $(CMD)

.PHONY: FORCE
FORCE:

# The CRDs are generated from the Rust types (crates/liveclone/src/k8s); a
# unit test fails while the checked-in copies differ.
.PHONY: crds
crds: deps
	$(CARGO) run -q -p liveclone --bin liveclone -- crdgen --out-dir deploy/crds
	$(CARGO) run -q -p liveclone --bin liveclone -- crdgen --out-dir charts/liveclone/crds
