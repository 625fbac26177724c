"""The agent image (`make image`) run as the DaemonSet runs it, enforcing examples/ in the lab.

The container's privileges, seccomp profile, mounts, env and args are read from deploy/ (a
kustomize build: deploy/ for nftables, deploy/overlays/ebpf for eBPF) and mapped onto a real
container runtime: Debian's podman with crun, which applies capabilities, no_new_privs,
seccomp, a read-only root and the mounts exactly as a CRI runtime does from a pod spec.
hostNetwork becomes the lab's node namespace (`--network ns:`), so every packet stays in the
lab. Two things of this machine, neither a privilege of the container:
- cgroups are v1 with a cgroup2 mount holding a controller ("hybrid"), which crun refuses:
  the runtime runs in a private mount namespace without /sys/fs/cgroup/unified (legacy v1);
- root here lacks CAP_SYS_RESOURCE, so crun cannot raise rlimits: they are set to at most
  this process's own (lowering needs no privilege). Kubernetes does not set rlimits either.
Substitutions, named where they happen: `--source=kubernetes` becomes the files source on
examples/ mounted read-only (the Kubernetes source is tested against a fake API server
elsewhere), NODE_NAME (fieldRef spec.nodeName) the examples' node, and hostPaths that the
agent writes (bpffs, state) test-owned stand-ins; /lib/modules and /usr/src are the host's.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import resource
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.pipeline import DirectoryPipeline
from agent.query import matrix
from tests.kit import ROOT, Lab, until
from tests.kit.kustomize import build
from tests.kit.privileges import ROOT_EXAMPLES, private_bpffs, require_privileges

DEPLOY = ROOT / "deploy"
# The deploy tree under test; STOCKADE_DEPLOY points at another (e.g. a site's overlays).
DEPLOY_UNDER_TEST = Path(os.environ.get("STOCKADE_DEPLOY", DEPLOY))
EBPF_OVERLAY = DEPLOY_UNDER_TEST / "overlays" / "ebpf"
# The eBPF overlay adds eBPF's privileges and mounts; a tree without one carries them in its base.
KUSTOMIZATIONS = {"nftables": DEPLOY_UNDER_TEST, "ebpf": EBPF_OVERLAY if EBPF_OVERLAY.is_dir() else DEPLOY_UNDER_TEST}
# Linux capability numbers (include/uapi/linux/capability.h), for reading /proc/PID/status.
CAP_NAMES = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
             "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
             "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
             "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
             "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
             "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"]
POLICIES_IN_CONTAINER = "/etc/stockade/policies"
METRICS_PORT = 9754
# Start-up in the container includes bcc compiling bpf/stockade.c (seconds on 2 busy cores).
READY_DEADLINE = 180.0
# The runtime in a private mount namespace without the hybrid cgroup2 mount (see above).
RUNTIME_WRAPPER = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   "if mountpoint -q /sys/fs/cgroup/unified; then umount /sys/fs/cgroup/unified; fi; "
                   'exec "$@"', "sh", "podman"]


@dataclass
class PodSpec:
    """The DaemonSet's one container, its volumes and the ConfigMaps it reads, as rendered."""
    container: dict[str, Any]
    volumes: dict[str, dict[str, Any]]
    configmaps: dict[str, dict[str, str]]

    @property
    def security(self) -> dict[str, Any]:
        return self.container.get("securityContext") or {}

    @property
    def capabilities(self) -> list[str]:
        caps = self.security.get("capabilities") or {}
        assert caps.get("drop") == ["ALL"], "the container must drop every capability it does not add"
        return list(caps.get("add") or [])

    @property
    def seccomp(self) -> str:
        # Kubernetes' default without seccompProfile (kubelet --seccomp-default off) is Unconfined.
        return (self.security.get("seccompProfile") or {}).get("type", "Unconfined")


def pod_spec(kustomization: Path) -> PodSpec:
    docs = build(kustomization)
    [ds] = [d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "stockade"]
    spec = ds["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert spec.get("hostNetwork") is True
    return PodSpec(container, {v["name"]: v for v in spec.get("volumes", [])},
                   {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"})


SPECS = {dp: pod_spec(k) for dp, k in KUSTOMIZATIONS.items()}


def container_env(spec: PodSpec, node: str, dataplane: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in spec.container.get("envFrom", []):
        env.update(spec.configmaps[src["configMapRef"]["name"]])
    for e in spec.container.get("env", []):  # explicit env wins over envFrom, as in Kubernetes
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[e["name"]] = node
        else:
            raise AssertionError(f"env {e['name']}: no stand-in for {e.get('valueFrom')}")
    env["STOCKADE_DATAPLANE"] = dataplane  # the ConfigMap's choice, per test
    return env


def container_args(spec: PodSpec, env: dict[str, str]) -> list[str]:
    """The container's args with $(VAR) expanded as the kubelet does; the Kubernetes source
    swapped for the files source on examples/."""
    out = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), a)
           for a in spec.container.get("args", [])]
    assert "--source=kubernetes" in out
    return [f"--source={POLICIES_IN_CONTAINER}" if a == "--source=kubernetes" else a for a in out]


STOCK_PROFILE = Path("/usr/share/containers/seccomp.json")
# What current runtimes' default profiles add for eBPF (moby's default.json, containerd >= 1.6.9,
# containers-common >= 0.60): bpf(2) with CAP_BPF, perf_event_open with CAP_PERFMON. Debian 12's
# containers-common (0.50) allows both only with CAP_SYS_ADMIN.
CAP_RULES = [{"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_BPF"]}},
             {"names": ["perf_event_open"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_PERFMON"]}}]


@functools.cache
def runtime_default_profile() -> str:
    """RuntimeDefault as a current runtime has it: this machine's stock profile plus CAP_RULES
    where it lacks them (unchanged rules otherwise). Written once per test process."""
    profile = json.loads(STOCK_PROFILE.read_text())
    for rule in CAP_RULES:
        [name], [cap] = rule["names"], rule["includes"]["caps"]
        if any(name in r["names"] and cap in r.get("includes", {}).get("caps", []) for r in profile["syscalls"]):
            continue  # a current profile already
        profile["syscalls"].append(rule)
        # The stock profile's explicit EPERM rule for it applies unless the container has one of
        # its excluded capabilities: the new capability must exempt it too.
        for r in profile["syscalls"]:
            excludes = r.get("excludes", {}).get("caps")
            if name in r["names"] and r["action"] == "SCMP_ACT_ERRNO" and excludes:
                excludes.append(cap)
    fd, path = tempfile.mkstemp(prefix="stockade-runtime-default-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(profile, f)
    atexit.register(os.unlink, path)
    return path


def podman_run(spec: PodSpec, image: str, name: str, netns: str, dataplane: str, node: str,
               host_paths: dict[str, str], without: str | None = None, seccomp: str | None = None) -> list[str]:
    """`podman run` arguments for the pod spec, with capability `without` left out and the
    seccomp profile type replaced by `seccomp` if given."""
    sec = spec.security
    assert sec.get("privileged") is not True
    grantable = caps_of(Path("/proc/self/status").read_text(), "CapBnd")
    for cap in spec.capabilities:
        if cap not in grantable:  # the runtime would silently leave it out
            pytest.fail(f"deploy/ lists capability {cap}, which this machine's root does not have to grant")
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 4096)
    args = ["run", "--rm", "--name", name, "--network", f"ns:/run/netns/{netns}",
            "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}",
            "--cap-drop", "ALL"]
    for cap in spec.capabilities:
        if cap != without:
            args += ["--cap-add", cap]
    if sec.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if sec.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # no tmpfs the pod spec does not list
    if "runAsUser" in sec:
        args += ["--user", str(sec["runAsUser"])]
    profile = seccomp or spec.seccomp
    if profile == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    elif profile == "RuntimeDefault":
        args += ["--security-opt", f"seccomp={runtime_default_profile()}"]
    elif profile != "stock":  # stock: this machine's containers-common profile as it is
        raise AssertionError(f"seccompProfile {profile}: no mapping in this test")
    memory = spec.container.get("resources", {}).get("limits", {}).get("memory")
    if memory:
        args += ["--memory", memory.replace("Mi", "m").replace("Gi", "g")]
    env = container_env(spec, node, dataplane)
    for k, v in sorted(env.items()):
        args += ["--env", f"{k}={v}"]
    for m in spec.container.get("volumeMounts", []):
        vol = spec.volumes[m["name"]]
        if "hostPath" in vol:
            src = host_paths.get(vol["hostPath"]["path"])
            if src is None:
                assert m.get("readOnly"), f"volume {m['name']}: a writable hostPath needs a test stand-in"
                src = vol["hostPath"]["path"]
            opts = [f"type=bind,src={src},dst={m['mountPath']}"]
            if m.get("readOnly"):
                opts.append("ro=true")
            if m.get("mountPropagation") == "HostToContainer":
                opts.append("bind-propagation=rslave")
            args += ["--mount", ",".join(opts)]
        elif "emptyDir" in vol and vol["emptyDir"].get("medium") == "Memory":
            size = vol["emptyDir"].get("sizeLimit", "64Mi").replace("Mi", "m").replace("Gi", "g")
            args += ["--mount", f"type=tmpfs,dst={m['mountPath']},tmpfs-size={size}"]
        else:
            raise AssertionError(f"volume {m['name']}: no stand-in for {sorted(vol)}")
    args += ["--mount", f"type=bind,src={ROOT_EXAMPLES},dst={POLICIES_IN_CONTAINER},ro=true"]
    if "command" in spec.container:
        args += ["--entrypoint", spec.container["command"][0]]
    return [*args, image, *spec.container.get("command", [])[1:], *container_args(spec, env)]


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image, or reuse it when its inputs did not change (deploy/image/build.sh)."""
    require_privileges()
    res = subprocess.run([str(DEPLOY / "image" / "build.sh")], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        pytest.fail(f"make image failed:\n{res.stderr[-4000:]}")
    return res.stdout.strip().splitlines()[-1]


@dataclass
class Agent:
    name: str
    proc: subprocess.Popen
    log: Path
    bpffs: Path | None  # the host side of the container's /sys/fs/bpf, if it has one

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pid(self) -> int:
        res = subprocess.run([*RUNTIME_WRAPPER, "inspect", "--format", "{{.State.Pid}}", self.name],
                             capture_output=True, text=True)
        return int(res.stdout.strip() or 0) if res.returncode == 0 else 0


@contextlib.contextmanager
def agent_container(lab: Lab, image: str, dataplane: str, without: str | None = None,
                    seccomp: str | None = None) -> Iterator[Agent]:
    spec = SPECS[dataplane]
    endpoints = DirectoryPipeline(ROOT_EXAMPLES, None).snapshot().inventory.endpoints
    [node_name] = {e.node for e in endpoints.values()}  # examples/ puts every pod on one node
    with contextlib.ExitStack() as stack:
        state = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{lab.prefix}-state-"))
        host_paths = {"/var/lib/stockade": state}
        bpffs = None
        if any(v.get("hostPath", {}).get("path") == "/sys/fs/bpf" for v in spec.volumes.values()):
            bpffs = Path(stack.enter_context(private_bpffs(lab.prefix))).parent
            host_paths["/sys/fs/bpf"] = str(bpffs)
        name = f"{lab.prefix}-agent"
        log = Path(stack.enter_context(tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log")).name)
        cmd = [*RUNTIME_WRAPPER, *podman_run(spec, image, name, lab.node, dataplane, node_name, host_paths,
                                             without, seccomp)]
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield Agent(name, proc, log, bpffs)
        finally:
            proc.terminate()  # podman forwards it to the agent; --rm removes the container
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            subprocess.run([*RUNTIME_WRAPPER, "rm", "--force", "--ignore", name], capture_output=True)


def ready(lab: Lab, agent: Agent) -> bool:
    if agent.proc.poll() is not None:
        raise AssertionError(f"the container exited ({agent.proc.returncode}):\n{agent.output()[-4000:]}")
    return lab.http_get(f"http://127.0.0.1:{METRICS_PORT}/readyz")[0] == 200


def caps_of(status: str, field: str) -> set[str]:
    mask = int(re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.M)[1], 16)
    return {n for i, n in enumerate(CAP_NAMES) if mask >> i & 1} | ({"?"} if mask >> len(CAP_NAMES) else set())


def build_lab(lab: Lab) -> list[Any]:
    eps = sorted(DirectoryPipeline(ROOT_EXAMPLES, None).snapshot().inventory.endpoints.values(),
                 key=lambda e: e.key)
    ports = sorted({p.port for e in eps for p in e.ports if p.protocol == "TCP"})
    for e in eps:
        lab.add_pod(e.key, [str(ip) for ip in e.ips], ports=ports)
    return eps


def wait_for_failure(lab: Lab, agent: Agent) -> str:
    """The last line of the agent's first failed sync (it must never become ready)."""
    failed = until(lambda: "sync failed" in agent.output() or agent.proc.poll() not in (None, 0),
                   timeout=READY_DEADLINE)
    out = agent.output()
    assert failed, out[-4000:]
    if agent.proc.poll() is None:
        assert lab.http_get(f"http://127.0.0.1:{METRICS_PORT}/readyz")[0] != 200
    record = out[out.index("sync failed"):] if "sync failed" in out else out
    return re.split(r"\n\d{4}-\d\d-\d\d \d\d:", record)[0].strip().splitlines()[-1]


@pytest.mark.parametrize("dataplane", list(KUSTOMIZATIONS))
def test_image_enforces_examples_with_the_daemonsets_privileges(image: str, dataplane: str) -> None:
    require_privileges()
    spec = SPECS[dataplane]
    with Lab() as lab:
        eps = build_lab(lab)
        with agent_container(lab, image, dataplane) as agent:
            assert until(lambda: ready(lab, agent), timeout=READY_DEADLINE), agent.output()[-4000:]
            # What the agent process really had, read by the host from /proc.
            pid = agent.pid()
            assert pid > 0
            status = Path(f"/proc/{pid}/status").read_text()
            assert caps_of(status, "CapEff") == set(spec.capabilities), status
            assert caps_of(status, "CapBnd") == set(spec.capabilities), status
            assert re.search(r"^NoNewPrivs:\s*1$", status, re.M), status
            assert re.search(rf"^Seccomp:\s*{2 if spec.seccomp == 'RuntimeDefault' else 0}$", status, re.M)
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{lab.node}").st_ino
            root = next(line for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                        if line.split()[4] == "/")
            assert "ro" in root.split()[5].split(","), root
            # The dataplane asked for is the one in the kernel: its table, or its pins in the bpffs
            # the container was given.
            has_table = lab.node_sh("nft", "list", "table", "inet", "stockade", check=False).returncode == 0
            assert has_table == (dataplane == "nftables")
            if dataplane == "ebpf":
                assert agent.bpffs is not None and any((agent.bpffs / "stockade").iterdir())
            # The kernel, programmed from inside the container, agrees with the simulator.
            snap = DirectoryPipeline(ROOT_EXAMPLES, None).snapshot()
            verdicts: set[bool] = set()
            for port in sorted({p.port for e in eps for p in e.ports if p.protocol == "TCP"}):
                sim = matrix(snap, str(port), "TCP", 4)
                specs = {s.key: [f"tcp:{d.ips[0]}:{port}" for d in eps if d is not s] for s in eps}
                seen = lab.probe_many(specs, timeout=0.5)
                for s in eps:
                    for d in eps:
                        if d is not s:
                            want = sim[s.key][d.key] == "allow"
                            assert seen[s.key][f"tcp:{d.ips[0]}:{port}"] == want, (s.key, d.key, port)
                            verdicts.add(want)
            assert verdicts == {True, False}  # examples both allow and deny something


CAP_CASES = [(dp, cap) for dp, spec in SPECS.items() for cap in spec.capabilities]


@pytest.mark.parametrize(("dataplane", "cap"), CAP_CASES, ids=[f"{d}-without-{c}" for d, c in CAP_CASES])
def test_each_listed_capability_is_needed(image: str, dataplane: str, cap: str) -> None:
    """One capability fewer than the DaemonSet lists: the agent says what failed and never
    reports ready."""
    require_privileges()
    with Lab() as lab:
        build_lab(lab)
        with agent_container(lab, image, dataplane, without=cap) as agent:
            last = wait_for_failure(lab, agent)
            # It says what is missing: the eBPF loader names the capability, nftables passes on
            # the kernel's EPERM.
            expected = f"lacks .*CAP_{cap}" if dataplane == "ebpf" else "Operation not permitted"
            assert re.search(expected, last), last


def test_ebpf_under_an_old_runtimes_default_profile_says_why(image: str) -> None:
    """An older runtime's default profile (this machine's containers-common 0.50, like
    containerd before 1.6.9) allows bpf(2) only with CAP_SYS_ADMIN, which the overlay does not
    grant: the agent stops and names seccomp as the cause (README: use a newer runtime or a
    Localhost profile that adds bpf)."""
    assert SPECS["ebpf"].seccomp == "RuntimeDefault"
    require_privileges()
    with Lab() as lab:
        build_lab(lab)
        with agent_container(lab, image, "ebpf", seccomp="stock") as agent:
            last = wait_for_failure(lab, agent)
            assert "refused bpf(2)" in last and "seccomp" in last, last
