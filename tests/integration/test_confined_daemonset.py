"""The Kubernetes agent works with exactly the privileges the DaemonSet grants it:
deploy/ (nftables) and deploy/overlays/ebpf (eBPF), as rendered by the manifest tests.

tests/kit/sandbox.py reproduces the container's capabilities, allowPrivilegeEscalation:
false (no_new_privs) and readOnlyRootFilesystem (writable: its volumes only), not the
runtime's RuntimeDefault seccomp profile, which belongs to containerd or CRI-O (see
deploy/overlays/ebpf/daemonset.yaml for what those allow). Two existing packet tests run
unchanged with the agent and the CLI confined this way: watch events changing verdicts,
and strict mode cutting established flows (conntrack over nfnetlink, or the BPF flow
table).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import pytest

from agent.dataplane.ebpf import PIN_ROOT_ENV
from tests.kit import Lab, enforcement, manifests, sandbox
from tests.kit import kubernetes_lab as kube


def _confine(lab: Lab, dataplane: str, writable: tuple[str, ...] = ()) -> sandbox.Confinement:
    """Run the lab's agent and CLI under the container of `dataplane`'s manifests."""
    rendered = manifests.MANIFESTS if dataplane == "nftables" else manifests.EBPF
    container = manifests.container(rendered)
    assert manifests.objects(rendered)[("ConfigMap", "stockade")]["data"]["STOCKADE_DATAPLANE"] == dataplane
    conf = sandbox.from_container(container)
    conf = dataclasses.replace(conf, writable=conf.writable + writable)
    assert set(conf.caps) <= sandbox.available_caps(), "deploy/ lists a capability this machine cannot grant"
    # The container's writable bpffs is the tests' own (the pin root's parent).
    paths = {"/sys/fs/bpf": os.path.dirname(os.environ[PIN_ROOT_ENV])} if PIN_ROOT_ENV in os.environ else {}
    lab.spawn_agent = functools.partial(sandbox.spawn_agent, lab, conf, paths=paths)  # type: ignore[method-assign]
    lab.stockade = functools.partial(sandbox.run_cli, lab, conf, paths=paths)  # type: ignore[method-assign]
    return conf


def test_kubernetes_agent_with_the_daemonsets_privileges(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    conf = _confine(lab, dataplane)
    assert conf.caps == (("net_admin",) if dataplane == "nftables" else
                         ("bpf", "net_admin", "perfmon"))
    assert conf.nnp and conf.protect_system == "strict"
    kube.watch_events_change_which_packets_pass(lab, dataplane, tmp_path)
    agent = lab.procs[-1]
    assert agent.poll() is None, lab.agent_output(agent)
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{agent.pid}/status").read_text().splitlines())
    assert status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == sandbox.cap_mask(conf.caps), status


def test_strict_mode_with_the_daemonsets_privileges(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    _confine(lab, dataplane)
    enforcement.strict_mode_cuts_flows_no_longer_allowed(lab, dataplane, tmp_path)


@pytest.mark.parametrize("dataplane", ["ebpf"], indirect=True)  # (for its private bpffs)
def test_the_base_cannot_run_ebpf(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    """Guard against a confinement that grants more than it says: with the nftables
    DaemonSet's privileges (and a writable bpffs, so only capabilities are missing) the
    eBPF dataplane does not load."""
    _confine(lab, "nftables", writable=("/sys/fs/bpf",))
    enforcement.build(lab)
    src = tmp_path / "src"
    enforcement.write(src, enforcement.cluster())
    res = lab.stockade("apply", "--source", str(src), "--node", "lab", "--dataplane", "ebpf", "--state-dir", "",
                       check=False)
    assert res.returncode != 0
    assert "lacks CAP_PERFMON, CAP_BPF" in res.stderr, res.stderr  # the loader names what is missing
