"""Restart safety: an agent process exits and a new one adopts the pinned maps and the
attached filters, converges, and never blocks an allowed flow nor passes a denied one
meanwhile (continuous probes). The second start does not recompile."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

from agent.dataplane.ebpf import PIN_ROOT_ENV, bpfsys, builds
from agent.ir import PortMatch
from tests.kit import ROOT, Lab
from tests.kit.ebpf_lab import A, B, C, build, program

AGENT = """
import json, pickle, sys
from agent.dataplane.ebpf import EbpfDataplane
prog = pickle.load(open(sys.argv[1], "rb"))
dp = EbpfDataplane()
stats = dp.apply(prog)
print(json.dumps({"load": dp.last_load, "written": stats.chains_written, "removed": stats.elements_removed,
                  "unattached": dp.unattached}))
"""


def run_agent(lab: Lab, prog_file: Path, pin_root: str) -> dict:
    env = dict(os.environ, **{PIN_ROOT_ENV: pin_root})
    res = subprocess.run(["ip", "netns", "exec", lab.node, sys.executable, "-c", AGENT, str(prog_file)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def filters(lab: Lab, dev: str) -> str:
    return lab.node_sh("tc", "filter", "show", "dev", dev, "egress").stdout


def test_restart_adopts_without_gaps(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    build(lab)
    prog_file = tmp_path / "program.pickle"
    prog_file.write_bytes(pickle.dumps(program()))
    first = run_agent(lab, prog_file, pin_root)
    assert first["load"].get("compile_s"), first  # compiled in a child of the agent
    assert not first["unattached"]
    before = filters(lab, "v1")
    assert "stockade" in before

    allowed = {"app/a": [f"tcp:{B}:80", f"udp:{B}:8000"]}
    denied = {"app/c": [f"tcp:{B}:80", f"tcp:{B}:81"], "app/a": [f"tcp:{C}:80"]}
    violations: list[str] = []
    rounds = [0]
    progress = threading.Condition()
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            specs = {src: allowed.get(src, []) + denied.get(src, []) for src in ("app/a", "app/c")}
            for src, res in lab.probe_many(specs, timeout=0.5).items():
                for spec, ok in res.items():
                    if ok != (spec in allowed.get(src, [])):
                        violations.append(f"{src} {spec} {'passed' if ok else 'blocked'}")
            with progress:
                rounds[0] += 1
                progress.notify_all()

    def round_after(seen: int) -> None:
        """Wait (generous deadline) until a probe round that started after `seen` ends."""
        with progress:
            assert progress.wait_for(lambda: rounds[0] >= seen + 2, timeout=60), "probes stalled"

    t = threading.Thread(target=probe)
    t.start()
    try:
        round_after(0)  # probes are running before the first restart
        for _ in range(3):  # stop/start the agent a few times while probes run
            seen = rounds[0]
            again = run_agent(lab, prog_file, pin_root)
            assert not again["load"], again  # adopted the pinned build: no compile
            assert again["written"] == 0  # every endpoint kept its pinned entries: nothing rewritten
            round_after(seen)  # a full round of probes ran after this restart began
    finally:
        stop.set()
        t.join()
    assert not violations, violations
    # filters were never detached or replaced: same program id on the interface
    assert filters(lab, "v1") == before
    assert lab.reachable("app/a", B, 80) and not lab.reachable("app/c", B, 80)
    assert A  # the allowed client


def pinned(pin_root: str, name: str) -> bpfsys.Map:
    (build_id, _), = builds.existing(pin_root)
    return bpfsys.Map.pinned(f"{pin_root}/{build_id}/{name}")


def test_restart_rewrites_what_differs_from_the_new_program(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    """Adoption keeps an endpoint's entries only when they are exactly what its new tables
    compile to: a changed program, or a pinned entry altered behind the agent's back, gets
    that endpoint rewritten, and packets are judged by the new program."""
    build(lab)
    prog_file = tmp_path / "program.pickle"
    prog = program()
    prog_file.write_bytes(pickle.dumps(prog))
    run_agent(lab, prog_file, pin_root)
    # one endpoint's peers entry changed in the kernel: its rule class now reads 0
    peers = pinned(pin_root, "peers")
    try:
        key = next(k for k, v in peers.dump() if v != (0).to_bytes(4, "little"))
        peers.update(key, (0).to_bytes(4, "little"))
    finally:
        peers.close()
    again = run_agent(lab, prog_file, pin_root)
    assert again["written"] == 1, again
    assert run_agent(lab, prog_file, pin_root)["written"] == 0  # and kept from then on
    assert lab.reachable("app/a", B, 80) and not lab.reachable("app/c", B, 80)
    # the program changed while no agent ran: app/b now refuses app/a on TCP 80
    b = prog.endpoints["app/b"]
    rules = tuple(dataclasses.replace(r, ports=(PortMatch("udp", 8000, 8003),)) if r.key == "a-web" else r
                  for r in b.ingress.rules)
    changed = dataclasses.replace(prog, endpoints={**prog.endpoints, "app/b": dataclasses.replace(
        b, ingress=dataclasses.replace(b.ingress, rules=rules))})
    prog_file.write_bytes(pickle.dumps(changed))
    assert run_agent(lab, prog_file, pin_root)["written"] == 1
    assert not lab.reachable("app/a", B, 80)


def test_cleanup_from_a_fresh_process(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    build(lab)
    prog_file = tmp_path / "program.pickle"
    prog_file.write_bytes(pickle.dumps(program()))
    run_agent(lab, prog_file, pin_root)
    assert not lab.reachable("app/c", B, 80)
    env = dict(os.environ, **{PIN_ROOT_ENV: pin_root})
    code = "from agent.dataplane.ebpf import EbpfDataplane; EbpfDataplane().cleanup()"
    res = subprocess.run(["ip", "netns", "exec", lab.node, sys.executable, "-c", code],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    for dev in ("v0", "v1", "v2"):
        assert "stockade" not in filters(lab, dev)
    assert not os.path.exists(pin_root)
    assert lab.reachable("app/c", B, 80)
