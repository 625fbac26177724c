"""The NetBird agent works under the confinement of systemd/stockade.service, and the
confinement is really in force.

systemd is not PID 1 here, so the unit cannot be started; tests/lab/sandbox.py applies
what the unit does to the process itself (capabilities, no_new_privs, the seccomp
filters of SystemCallFilter=, RestrictAddressFamilies=, MemoryDenyWriteExecute=), read
from the unit's text, plus the eBPF drop-in on the eBPF dataplane. The mount-namespace
settings (ProtectSystem= and friends) are not reproduced.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import test_netbird_packets as nb
from tests.lab import sandbox
from tests.lab.netbird import wait_for

env = nb.env  # the NetBird lab: overlay, management-API server, agent command line


def _files(dataplane: str) -> list[Path]:
    return [sandbox.UNIT, *([sandbox.EBPF_DROPIN] if dataplane == "ebpf" else [])]


def test_netbird_agent_under_the_units_confinement(env: nb.NbEnv) -> None:
    """The whole main NetBird case (both directions, NetBird's bypass rule, API outage,
    recovery) with the agent, its nft and loader children confined as the unit says."""
    conf = sandbox.confinement(*_files(env.dataplane))
    # The test machine itself lacks CAP_SYS_RESOURCE; it only matters on kernels < 5.11.
    assert set(conf.caps) - sandbox.available_caps() <= {"sys_resource"}
    env.lab.spawn_agent = functools.partial(sandbox.spawn_agent, env.lab, conf)  # type: ignore[method-assign]
    nb.test_netbird_policies_enforced_on_wt0_both_directions(env)
    assert env.agent is not None
    # The agent we probed is the confined one (`ip netns exec`, setpriv and the sandbox exec
    # in turn, so the pid we spawned is the agent's).
    status = Path(f"/proc/{env.agent.pid}/status").read_text()
    assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status, status
    # Drop samples (NFLOG over nfnetlink, or the BPF queue map) came through: bob's
    # tcp/80 was dropped by block-bob.
    assert wait_for(lambda: any("block-bob" in " ".join(d["policies"]) for d in json.loads(env.get("/drops")[1])),
                       timeout=30), env.get("/drops")[1]
    # Nothing the confinement refused was merely logged: strict mode's flow dump after
    # every sync and the drop sampler log a warning when they fail.
    log = env.agent_log()
    assert " WARNING " not in log and "Traceback" not in log, log


@pytest.mark.parametrize("dataplane_files", ["nftables", "ebpf"])
def test_the_confinement_is_in_force(dataplane_files: str) -> None:
    """Guard against a sandbox that confines nothing: what the unit forbids fails."""
    conf = sandbox.confinement(*_files(dataplane_files))

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run(sandbox.command(conf, [sys.executable, "-c", code]), capture_output=True,
                              text=True, cwd=sandbox.ROOT, timeout=60)

    ok = run("import json; print(json.dumps(open('/proc/self/status').read()))")
    assert ok.returncode == 0, ok.stderr
    status = dict(line.split(":\t", 1) for line in json.loads(ok.stdout).splitlines())
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    want = sum(1 << n for n in _cap_numbers(conf.caps))
    assert int(status["CapEff"], 16) == want == int(status["CapBnd"], 16)
    # @privileged is removed: setuid() kills the process (no SystemCallErrorNumber=).
    assert run("import os; os.setuid(0)").returncode == -signal.SIGSYS
    # bpf(2) only with the eBPF drop-in (BPF_MAP_CREATE with a zeroed attr: EINVAL if allowed).
    probe = run("import ctypes; a = ctypes.create_string_buffer(128); "
                "print(ctypes.CDLL(None, use_errno=True).syscall(321, 0, a, 128), ctypes.get_errno())")
    if dataplane_files == "ebpf":
        assert probe.returncode == 0, probe.stderr
    else:
        assert probe.returncode == -signal.SIGSYS
    # RestrictAddressFamilies=: no packet sockets.
    packet = run("import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)")
    assert packet.returncode == 1 and "Errno 97" in packet.stderr
    # MemoryDenyWriteExecute=
    wx = run("import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)")
    assert wx.returncode == 1 and "Errno 1" in wx.stderr


def _cap_numbers(caps: tuple[str, ...]) -> list[int]:
    names = subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True, check=True).stdout.split()
    return [names.index(c) for c in caps if c in sandbox.available_caps()]
