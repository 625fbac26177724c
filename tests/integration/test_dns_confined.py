"""`--dns-egress` works with exactly the privileges deploy/overlays/dns-egress grants, on
both dataplanes (the overlay runs eBPF; nftables with the same privileges is its ConfigMap
changed), by real packets: the agent runs under the overlay's container settings as
tests/kit/sandbox.py reproduces them (capabilities, no_new_privs, read-only root file
system), its bcc loader child inherits them, and a pod's first connection after a UDP and
after a TCP answer is allowed; the agent process never maps bcc or LLVM (its loader child
compiles). With the eBPF overlay's privileges (no CAP_NET_RAW) the agent
refuses `--dns-egress`, naming what is missing: the confinement grants no more than it says.

Likewise systemd/stockade.service.d/dns-egress.conf on top of the unit (and of ebpf.conf for
eBPF), with the unit's seccomp filter and address families (which the DaemonSet's
RuntimeDefault profile is not reproduced for), with a manifest directory as the source.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

from agent.dataplane.ebpf import PIN_ROOT_ENV
from agent.dns import hold
from tests.kit import ROOT, Lab, dns_lab, sandbox, until
from tests.kit.kustomize import render
from tests.kit.manifests import EBPF, container

CLIENT, SERVER, WEB, ELSEWHERE = "10.38.0.1", "10.38.0.53", "10.38.1.80", "10.38.1.81"
PODS = {"app/client": [CLIENT], "dns/server": [SERVER], "ext/web": [WEB], "ext/never": [ELSEWHERE]}
DOCS = dns_lab.manifests(PODS, dns_lab.names_policy(["0.0.0.0/0", "::/0"]))
DNS = render(ROOT / "deploy" / "overlays" / "dns-egress", ROOT / "deploy")
DNS_DROPIN = ROOT / "systemd" / "stockade.service.d" / "dns-egress.conf"


def confine(lab: Lab, rendered: list) -> sandbox.Confinement:
    conf = sandbox.from_container(container(rendered))
    assert set(conf.caps) <= sandbox.available_caps(), "the overlay lists a capability this machine cannot grant"
    paths = {"/sys/fs/bpf": os.path.dirname(os.environ[PIN_ROOT_ENV])} if PIN_ROOT_ENV in os.environ else {}
    lab.spawn_agent = functools.partial(sandbox.spawn_agent, lab, conf, paths=paths)  # type: ignore[method-assign]
    return conf


def start(lab: Lab, tmp: Path, dataplane: str, state: str = "") -> subprocess.Popen:
    src = dns_lab.setup(lab, tmp, PODS, DOCS, dns_lab.server_script(WEB, "fd00:38:1::80", ELSEWHERE))
    return lab.spawn_agent("run", "--source", str(src), "--node", "n1", "--dataplane", dataplane,
                           "--state-dir", state, "--metrics-address", "127.0.0.1:9756", "--dns-egress")


def first_connections_allowed(lab: Lab, agent: subprocess.Popen) -> None:
    assert until(lambda: lab.http_get("http://127.0.0.1:9756/readyz")[0] == 200, 120), lab.agent_output(agent)
    got = dns_lab.resolve_and_connect(lab, "app/client", SERVER, "www.example.test", ELSEWHERE)
    assert got == {"addrs": [WEB], "connected": {WEB: True, ELSEWHERE: False}}, lab.agent_output(agent)
    got = dns_lab.resolve_and_connect(lab, "app/client", SERVER, "split.example.test", tcp=True)
    assert got == {"addrs": [WEB], "connected": {WEB: True}}, lab.agent_output(agent)
    text = lab.http_get("http://127.0.0.1:9756/metrics")[1]
    assert 'stockade_dns_answers_total{outcome="learned"} 2.0' in text
    # bcc compiled the hold in a child: the agent itself never mapped bcc or LLVM
    maps = Path(f"/proc/{agent.pid}/maps").read_text()
    assert "libbcc" not in maps and "LLVM" not in maps


def test_dns_egress_with_the_overlays_privileges(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    conf = confine(lab, DNS)
    assert conf.caps == tuple(sorted(c.removeprefix("CAP_").lower() for c in hold.CAPABILITIES))
    assert conf.nnp and conf.protect_system == "strict"
    first_connections_allowed(lab, start(lab, tmp_path, dataplane))


def test_dns_egress_under_the_units_confinement(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    files = [sandbox.UNIT, *([sandbox.EBPF_DROPIN] if dataplane == "ebpf" else []), DNS_DROPIN]
    conf = sandbox.confinement(*files)
    assert {"net_raw", "bpf", "perfmon", "net_admin"} <= set(conf.caps) <= sandbox.available_caps() | {"sys_resource"}
    assert "AF_PACKET" in (conf.families or ()) and conf.syscalls and "bpf" in conf.syscalls
    paths = {"/var/lib/stockade": str(tmp_path / "state")}
    if PIN_ROOT_ENV in os.environ:
        paths["/sys/fs/bpf"] = os.path.dirname(os.environ[PIN_ROOT_ENV])
    lab.spawn_agent = functools.partial(sandbox.spawn_agent, lab, conf, paths=paths)  # type: ignore[method-assign]
    (tmp_path / "state").mkdir()
    agent = start(lab, tmp_path, dataplane, state=str(tmp_path / "state"))
    first_connections_allowed(lab, agent)
    assert "Seccomp:\t2" in Path(f"/proc/{agent.pid}/status").read_text()


@pytest.mark.parametrize("dataplane", ["ebpf"], indirect=True)  # (for its private bpffs)
def test_the_ebpf_overlay_cannot_run_dns_egress(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    confine(lab, EBPF)
    agent = start(lab, tmp_path, dataplane)
    assert until(lambda: agent.poll() is not None, 120), "the agent ran --dns-egress without CAP_NET_RAW"
    assert "lacks CAP_NET_RAW" in lab.agent_output(agent), lab.agent_output(agent)


