# liveclone — build and test entry points.
#
#   make test       every tier (the README's test command; what .ci/run calls):
#                   lint, one build of every test binary, host tests, the image
#                   build steps, the tests against a real kube-apiserver, the
#                   real-kernel tests and power cuts in the VM, then the LVM
#                   benchmark figures; tests/tools/test-all.sh runs them in that
#                   order, prepares the VM and the Go tools in the background
#                   meanwhile, and prints how long each step took
#   make test-unit  host tests only (no root, no device-mapper): host_* targets,
#                   unit and doc tests
#   make test-k8s   tests against etcd + kube-apiserver on loopback (CRDs,
#                   status subresource, printer columns, RBAC, the chart); builds
#                   the Kubernetes tools from the Go module proxy once (cached)
#   make test-vm    real-kernel tests (test-real), power cuts (test-power-cuts)
#                   and the LVM figures (bench-lvm-ci) in a QEMU VM whose kernel
#                   has dm-clone (LIVECLONE_TEST_ON_HOST=1: real_* on this host
#                   instead, as root, if its kernel has dm-clone)
#   make vm-prepare install QEMU and build the VM kernel bits (cached)
#   make tools      build the pinned Go test tools, e.g. csi-sanity (cached)
#   make deps       install the system packages the build needs (libdevmapper, libclang)
#   make vm-shell   boot the test VM and run CMD (default: a short report)
#   make demo-vm    the live-clone story on a real kernel, no cluster needed
#   make bench      benchmarks in the VM, as ratios to same-run baselines (docs/BENCHMARKS.md):
#                   the file pool's (bench_driver) and the LVM classes' (bench_lvm)
#   make bench-lvm  the LVM classes' benchmarks alone (bench-lvm-ci: figures 1 and 4)
#   make crds       regenerate the CRD YAML in deploy/crds and charts/liveclone/crds

CARGO ?= cargo
VMTEST := target/debug/vmtest
VM_TIMEOUT ?= 3000
CMD ?= sh -c 'uname -a; dmsetup targets; lsblk'
# The two empty sparse disks real_lvm_driver makes its volume group on
# (made afresh for every run of test-vm; the guest sees them as
# /dev/disk/by-id/virtio-lc-lvm-a and -b).
LVM_DISKS := $(CURDIR)/target/vm-disks/lvm-a.img $(CURDIR)/target/vm-disks/lvm-b.img
LVM_DISK_SIZE := 3G

# The features of every test tier at once. Every cargo command below builds
# with exactly these, so the crates are compiled once and each tier reuses the
# same artifacts (a tier with its own feature set would rebuild the workspace).
# Which tests a tier runs is chosen by target name (tests/tools/check-test-tiers.sh).
TEST_FEATURES := vmtest/real-kernel,vmtest/vm,liveclone/real-kernel,liveclone/vm,liveclone/k8s,kubetest/k8s,liveclone-e2e/kind
TEST_CARGO = $(CARGO) test --workspace --features $(TEST_FEATURES)

.PHONY: test test-unit test-build test-vm test-real test-power-cuts test-k8s k8s-tools lint vm-prepare vm-shell build demo-vm tools bench deps

test:
	bash tests/tools/test-all.sh

deps:
	bash tests/tools/install-build-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --features $(TEST_FEATURES) -- -D warnings

test-build: deps
	$(TEST_CARGO) --no-run

test-unit: deps
	$(TEST_CARGO) --lib --bins --examples --test 'host_*'
	$(TEST_CARGO) --doc

vm-prepare:
	bash tests/vm/prepare.sh

tools:
	bash tests/tools/build-go-tools.sh

k8s-tools:
	bash tests/tools/build-k8s-tools.sh

test-k8s: deps k8s-tools
	$(TEST_CARGO) --test 'k8s_*'

# Built with the test features so that it shares the dependencies' artifacts
# with the test build (a plain `-p vmtest` resolves other features for them).
$(VMTEST): FORCE deps
	$(CARGO) build --workspace --features $(TEST_FEATURES) --bin vmtest

test-vm: test-real test-power-cuts
ifneq ($(LIVECLONE_TEST_ON_HOST),1)
	$(MAKE) bench-lvm-ci
endif

# One boot runs every real_* target (test-threads=1: they share the VM's
# devices); the two sparse disks are real_lvm_driver's volume group.
test-real: $(VMTEST) tools k8s-tools
ifneq ($(LIVECLONE_TEST_ON_HOST),1)
	bash tests/vm/prepare.sh
endif
	rm -f $(LVM_DISKS)
	mkdir -p $(dir $(firstword $(LVM_DISKS)))
	truncate -s $(LVM_DISK_SIZE) $(LVM_DISKS)
	$(VMTEST) test --timeout $(VM_TIMEOUT) --test-arg=--test-threads=1 \
		--disk lc-lvm-a=$(word 1,$(LVM_DISKS)) --disk lc-lvm-b=$(word 2,$(LVM_DISKS)) \
		-- --workspace --features $(TEST_FEATURES) --test 'real_*'
	rm -f $(LVM_DISKS)

# Each vm_* test boots the VM itself, twice: before and after the cut.
test-power-cuts: $(VMTEST)
ifeq ($(LIVECLONE_TEST_ON_HOST),1)
	@echo "vm_* tests (power cuts) need the VM; skipped on the host"
else
	bash tests/vm/prepare.sh
	$(TEST_CARGO) --test 'vm_*' -- --test-threads=1
endif

demo-vm: $(VMTEST)
	bash tests/vm/prepare.sh
	$(CARGO) build -p liveclone --bin liveclone --example csi
	$(VMTEST) run -- bash tests/vm/demo.sh

# The benchmarks' VM: bench_lvm's volume group goes on two virtio disks,
# sparse files on this host made anew for each run and removed after it
# (also when the run fails). They only take the space the figures write
# (a few GiB); the size is what figure 1's three 64 GiB thick LVs need.
BENCH_DISKS := $(CURDIR)/target/bench-disks
BENCH_DISK_SIZE ?= 128G
BENCH_TIMEOUT ?= 6000
# BENCH_FIGURES=1,4 runs only those figures (LIVECLONE_BENCH_FIGURES).
BENCH_VM = $(VMTEST) test --timeout $(BENCH_TIMEOUT) --memory 2048 \
	$(if $(BENCH_FIGURES),--env LIVECLONE_BENCH_FIGURES=$(BENCH_FIGURES)) \
	--disk lc-bench-a=$(BENCH_DISKS)/lc-bench-a.img \
	--disk lc-bench-b=$(BENCH_DISKS)/lc-bench-b.img \
	--test-arg=--ignored --test-arg=--nocapture --test-arg=--test-threads=1 \
	-- --workspace --features $(TEST_FEATURES)
BENCH_RUN = rm -rf $(BENCH_DISKS) && mkdir -p $(BENCH_DISKS) && \
	truncate -s $(BENCH_DISK_SIZE) $(BENCH_DISKS)/lc-bench-a.img $(BENCH_DISKS)/lc-bench-b.img && \
	{ $(BENCH_VM) $(1); status=$$?; rm -rf $(BENCH_DISKS); exit $$status; }

# The file pool's figures and the LVM classes' figures, in one boot.
bench: $(VMTEST)
	bash tests/vm/prepare.sh
	$(call BENCH_RUN,--test bench_driver --test bench_lvm)

# The LVM classes' figures alone (thick and thin).
.PHONY: bench-lvm bench-lvm-ci
bench-lvm: $(VMTEST)
	bash tests/vm/prepare.sh
	$(call BENCH_RUN,--test bench_lvm)

# What CI's VM tier runs of them (about 5 minutes under TCG): figure 1
# (clone to mounted, 1 GiB and 64 GiB sources, against dd) and figure 4
# (IOPS through the clone table against linear), for thick and thin. The
# figures are printed; a miss does not fail, a figure that cannot be
# measured does.
bench-lvm-ci: $(VMTEST)
	bash tests/vm/prepare.sh
	$(MAKE) bench-lvm BENCH_FIGURES=1,4

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

# --- image-check (helper) ---
# The container image's build script, run on the host: compile and check
# the binary, prove the runtime tool list against the sources and this
# machine's packages, and check that the Dockerfile calls only build.sh
# subcommands that exist. The compile uses the dev profile: it reuses the
# test build's artifacts (seconds), where a release compile would add many
# minutes to every CI run; the release build itself runs in `docker build`.
.PHONY: image-check
image-check: deps
	LIVECLONE_BUILD_PROFILE=dev bash deploy/image/build.sh compile target/image
	bash deploy/image/build.sh check-runtime
	bash deploy/image/build.sh check-dockerfile Dockerfile

# --- kind e2e and demo (helper) ---
# The scenarios on a kind cluster (docs/E2E.md): needs Docker, kind, helm,
# kubectl and a host kernel with dm-clone. One at a time (the node-plugin
# restart would land in the middle of the others). The cluster is deleted
# afterwards unless LIVECLONE_E2E_KEEP=1; E2E_ARGS picks scenarios.
E2E_CLUSTER ?= $(or $(LIVECLONE_E2E_CLUSTER),liveclone-e2e)
.PHONY: e2e demo
e2e:
	$(CARGO) test -p liveclone-e2e --features kind --test kind_e2e -- --test-threads=1 --nocapture $(E2E_ARGS); \
	status=$$?; \
	if [ "$${LIVECLONE_E2E_KEEP:-0}" != 1 ] && command -v kind >/dev/null 2>&1; then \
		kind delete cluster --name "$(E2E_CLUSTER)"; fi; \
	exit $$status
demo:
	bash deploy/kind/demo.sh
