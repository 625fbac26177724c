"""The NetBird agent works under the confinement of systemd/stockade.service, and the
confinement is really in force.

systemd is not PID 1 here, so the unit cannot be started; tests/kit/sandbox.py applies
what the unit does to the process itself, read from the unit's text (plus the eBPF
drop-in on the eBPF dataplane): capabilities, no_new_privs, the seccomp filters of
SystemCallFilter= and the Restrict*/LockPersonality/MemoryDenyWriteExecute settings, and
the file-system protections (ProtectSystem=strict, ProtectKernel*, ProtectHome,
ProtectProc) in a mount namespace. Its docstring lists what it does not reproduce.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.dataplane.ebpf import PIN_ROOT_ENV
from tests.kit import netbird_env as nb
from tests.kit import sandbox
from tests.kit.netbird_lab import wait_for

env = nb.env  # the NetBird lab: overlay, management-API server, agent command line


def _files(dataplane: str) -> list[Path]:
    return [sandbox.UNIT, *([sandbox.EBPF_DROPIN] if dataplane == "ebpf" else [])]


def test_netbird_agent_under_the_units_confinement(env: nb.NbEnv) -> None:
    """The whole main NetBird case (both directions, NetBird's bypass rule, API outage,
    recovery) with the agent, its nft and loader children confined as the unit says."""
    conf = sandbox.confinement(*_files(env.dataplane))
    # The test machine itself lacks CAP_SYS_RESOURCE; it only matters on kernels < 5.11.
    assert set(conf.caps) - sandbox.available_caps() <= {"sys_resource"}
    # The unit's writable paths, as this test has them: the agent's --state-dir, and for
    # eBPF the bpffs the tests mount (the pin root's parent; /sys/fs/bpf in production).
    paths = {"/var/lib/stockade": str(env.tmp / "state")}
    if env.dataplane == "ebpf":
        paths["/sys/fs/bpf"] = os.path.dirname(os.environ[PIN_ROOT_ENV])
    env.lab.spawn_agent = functools.partial(sandbox.spawn_agent, env.lab, conf, paths=paths)  # type: ignore[method-assign]
    nb.netbird_policies_enforced_on_wt0_both_directions(env)
    assert env.agent is not None
    # The agent we probed is the confined one (`ip netns exec`, setpriv and the sandbox exec
    # in turn, so the pid we spawned is the agent's).
    status = Path(f"/proc/{env.agent.pid}/status").read_text()
    assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status, status
    root = [line.split() for line in Path(f"/proc/{env.agent.pid}/mountinfo").read_text().splitlines()
            if line.split()[4] == "/"]
    assert root and all(fields[5].split(",")[0] == "ro" for fields in root), root  # ProtectSystem=strict
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
    want = sandbox.cap_mask(conf.caps)
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
    # RestrictNamespaces=: unshare(CLONE_NEWNET) is refused.
    ns = run("import ctypes; print(ctypes.CDLL(None, use_errno=True).unshare(0x40000000), ctypes.get_errno())")
    assert ns.stdout.split() == ["-1", "1"], ns.stdout + ns.stderr
    # The file-system protections.
    files = run("import os, json\n"
                "def t(f):\n"
                "    try:\n        f()\n        return 0\n"
                "    except OSError as e:\n        return e.errno\n"
                "print(json.dumps({'usr': t(lambda: open('/usr/stockade-probe', 'w')),"
                " 'tmp': t(lambda: os.unlink(open('/tmp/stockade-sandbox-probe', 'w').name)),"
                " 'kallsyms': t(lambda: open('/proc/kallsyms').read(1)),"
                " 'modules': t(lambda: os.listdir('/usr/lib/modules')),"
                " 'sysctl': t(lambda: open('/proc/sys/net/ipv4/ip_forward', 'w')),"
                " 'home': t(lambda: os.listdir('/root'))}))")
    assert files.returncode == 0, files.stderr
    assert json.loads(files.stdout) == {
        "usr": errno.EROFS, "tmp": 0, "kallsyms": errno.EACCES, "sysctl": errno.EROFS, "home": errno.EACCES,
        # bcc reads the kernel headers there: the eBPF drop-in turns ProtectKernelModules off.
        "modules": 0 if dataplane_files == "ebpf" else errno.EACCES,
    }

