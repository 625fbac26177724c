"""The reliability scenarios. Each takes a fresh lab and a work directory and returns its
figures (a dict); `failures` in it lists every wrong verdict or broken expectation
(target: empty). They never pass or fail on time."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.kit import Lab
from tests.kit.builders import dump_manifests
from tests.kit.reliability.harness import (
    Agent,
    NodeHttp,
    Prober,
    Window,
    build_lab,
    disagreements,
    judge,
    probe_round,
    wall,
)
from tests.kit.reliability.world import (
    NODE,
    World,
    base_world,
    cross_mixture,
    expected,
    expected_with_directions,
    large_update,
    mutate,
    random_world,
    write_atomic,
)


def _agent(lab: Lab, work: Path, dataplane: str) -> Agent:
    return Agent(lab, work / "src", work / "state", dataplane, NodeHttp(lab))


# ------------------------------------------------------------------ 1. restart loop


def restart_loop(lab: Lab, dataplane: str, work: Path, restarts: int, filler: int, seed: int) -> dict[str, Any]:
    """Continuous TCP+UDP probes while `stockade run` is SIGKILLed and restarted; once right
    after a large update was written (hundreds of pods and policies, isolation swapped)."""
    rng = random.Random(seed)
    build_lab(lab)
    agent = _agent(lab, work, dataplane)
    src = agent.src
    world = base_world()
    write_atomic(src, world.docs())
    old, old_dirs = expected_with_directions(src)
    agent.start()
    agent.wait_ready()
    timeline = [(0.0, old)]
    windows: list[Window] = []
    ready_s: list[float] = []
    events: list[str] = []  # the run's timeline, shown with any wrong probe
    big_at = restarts // 2
    prober = Prober(lab)
    try:
        with prober.running():
            time.sleep(1.0)
            for i in range(restarts):
                if i == big_at:
                    big = large_update(world, filler)
                    write_atomic(work / "next", big.docs())
                    new, new_dirs = expected_with_directions(work / "next")
                    t0 = time.monotonic()
                    write_atomic(src, big.docs())
                    events.append(f"{wall(t0)} large update written")
                    time.sleep(rng.uniform(0.0, 0.3))  # the old agent may be mid-sync
                else:
                    time.sleep(rng.uniform(0.3, 1.0))
                k = time.monotonic()
                agent.restart()
                ready = agent.wait_ready()
                ready_s.append(ready - k)
                events.append(f"{wall(k)} kill {i}, {wall(ready)} ready")
                if i == big_at:
                    windows.append(Window(t0, ready, old, new, old_dirs, new_dirs))
                    timeline.append((ready, new))
                    old = new
            time.sleep(1.0)
        wrong = judge(prober.probes, timeline, windows)
    finally:
        agent.stop()
        agent.http.close()
    return {
        "restarts": agent.restarts, "large_update_pods": filler, "large_update_policies": filler,
        "probes": len(prober.probes), "probes_tcp": sum(p.key[2] == "tcp" for p in prober.probes),
        "probes_udp": sum(p.key[2] == "udp" for p in prober.probes),
        "probes_in_update_window": sum(1 for p in prober.probes for w in windows
                                       if p.end >= w.start and p.start <= w.end),
        "wrong_verdicts": len(wrong),
        "cross_endpoint_mixtures": sum(w.startswith("cross-endpoint") for w in wrong),
        "restart_to_ready_s_max": round(max(ready_s, default=0), 3),
        "restart_to_ready_s_mean": round(sum(ready_s) / max(1, len(ready_s)), 3),
        "failures": wrong[:50] + [f"prober: {e}" for e in prober.errors[:5]],
        **({"timeline": events, "agent_log_tail": agent.output()[-6000:]} if wrong else {}),
    }


# ------------------------------------------------------------------ 2. churn


def churn(lab: Lab, dataplane: str, work: Path, changes: int, seed: int) -> dict[str, Any]:
    """Random policy / pod-label / namespace-label changes in bursts; at each quiescent point
    the kernel's verdicts (real probes) must equal `stockade matrix` for the directory."""
    rng = random.Random(seed)
    build_lab(lab)
    agent = _agent(lab, work, dataplane)
    world = random_world(rng)
    write_atomic(agent.src, world.docs())
    agent.start()
    kinds: dict[str, int] = {}
    points = probes = late = unrepeated = 0
    failures: list[str] = []
    notes: list[str] = []  # first-probe disagreements that a second probe did not confirm
    try:
        agent.wait_ready()
        done = 0
        while done < changes:
            burst = min(changes - done, rng.choice([1, 1, 2, 3]))
            before = agent.syncs()
            for _ in range(burst):
                kind = mutate(world, rng)
                kinds[kind] = kinds.get(kind, 0) + 1
                write_atomic(agent.src, world.docs())
            done += burst
            agent.wait_synced(before)
            want = expected(agent.src)
            synced = agent.syncs()
            seen = probe_round(lab)
            points += 1
            probes += len(seen)
            wrong = disagreements(seen, want)
            if wrong:  # probe again a second later: a lasting error, a late sync, or one lost probe
                time.sleep(1.0)
                again = probe_round(lab)
                probes += len(again)
                if agent.syncs() != synced:  # the point was not quiescent: judge the one after it
                    agent.wait_synced(synced)
                    again = probe_round(lab)
                    probes += len(again)
                    lasting = set(disagreements(again, want))
                    failures += [f"after change {done}, after a late sync: {d}" for d in lasting]
                    late += len(wrong)
                    notes += [f"after change {done} (a sync came after the quiet period): {d}" for d in wrong]
                else:
                    lasting = set(disagreements(again, want))
                    failures += [f"after change {done}: {d}" for d in wrong if d in lasting]
                    unrepeated += len([d for d in wrong if d not in lasting])
                    notes += [f"after change {done} (not repeated 1 s later, same kernel state): {d}"
                              for d in wrong if d not in lasting]
    finally:
        agent.stop()
        agent.http.close()
    return {"changes": changes, "by_kind": kinds, "quiescent_points": points, "probes": probes,
            "disagreements": len(failures), "late_sync": late, "unrepeated": unrepeated,
            "failures": failures[:50], "notes": notes[:50]}


# ------------------------------------------------------------------ 4. crash safety


def _classify(seen: dict, old: dict, new: dict, dirs: tuple[dict, dict]) -> tuple[str, list[str]]:
    if seen == old:
        return "old", []
    if seen == new:
        return "new", []
    odd = [k for k, ok in seen.items() if ok not in (old[k], new[k])]
    if odd and all(cross_mixture(dirs[0], dirs[1], k, seen[k]) for k in odd):
        return "cross_endpoint", [f"cross-endpoint: {s}->{d} {p}/{n} {'passed' if seen[(s, d, p, n)] else 'blocked'}"
                                  for s, d, p, n in sorted(odd)]
    wider = [f"{s}->{d} {p}/{n} passed (neither policy allows it)" for (s, d, p, n), ok in sorted(seen.items())
             if ok and not old[(s, d, p, n)] and not new[(s, d, p, n)]]
    narrower = [f"{s}->{d} {p}/{n} blocked (both policies allow it)" for (s, d, p, n), ok in sorted(seen.items())
                if not ok and old[(s, d, p, n)] and new[(s, d, p, n)]]
    return "mixture", wider + narrower or ["a per-pair mixture of the two policies"]


def crash_safety(lab: Lab, dataplane: str, work: Path, kills: int, filler: int, seed: int) -> dict[str, Any]:
    """SIGKILL `stockade apply` and `stockade run` at random points of a large transaction:
    the kernel must hold the previous or the next policy (whole), and a restarted agent must
    converge to the next one without a flush (continuous probes while it starts)."""
    rng = random.Random(seed)
    build_lab(lab)
    agent = _agent(lab, work, dataplane)
    src = agent.src
    p1 = large_update(base_world(), filler)
    p1.policies.update(base_world().policies)  # P1: filler, swap "before"
    p2 = large_update(base_world(), filler)    # P2: filler with other ports, swap "after"
    p2.variant = p1.variant + 1
    worlds: dict[str, World] = {"p1": p1, "p2": p2}
    want, dirs = {}, {}
    for name, w in worlds.items():
        write_atomic(src, w.docs())
        want[name], dirs[name] = expected_with_directions(src)
    apply_args = ("apply", "--source", str(src), "--node", NODE, "--dataplane", dataplane,
                  "--state-dir", str(agent.state))

    def apply(kill_after: float | None = None) -> float:
        t0 = time.monotonic()
        proc = lab.spawn_agent(*apply_args)  # registered with the lab: killed with it on failure
        if kill_after is None:
            proc.wait(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"apply failed: {lab.agent_output(proc)[-2000:]}")
            return time.monotonic() - t0
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        return time.monotonic() - t0

    outcomes = {"apply": {"old": 0, "new": 0, "mixture": 0, "cross_endpoint": 0, "finished": 0},
                "run": {"old": 0, "new": 0, "mixture": 0, "cross_endpoint": 0}}
    failures: list[str] = []
    cur = "p1"
    write_atomic(src, worlds[cur].docs())
    apply()
    durations = []
    for nxt in ("p2", "p1"):  # how long a whole apply takes, to spread the kills over it
        write_atomic(src, worlds[nxt].docs())
        durations.append(apply())
        cur = nxt
    span = max(durations)
    # -- stockade apply
    for i in range(kills):
        nxt = "p2" if cur == "p1" else "p1"
        write_atomic(src, worlds[nxt].docs())
        delay = rng.uniform(0.3 * span, span)
        took = apply(kill_after=delay)
        seen = probe_round(lab)
        state, why = _classify(seen, want[cur], want[nxt], (dirs[cur], dirs[nxt]))
        if took < delay:
            outcomes["apply"]["finished"] += 1
        outcomes["apply"][state] += 1
        failures += [f"apply kill {i} at {delay:.2f}s: {w}" for w in why]
        apply()  # the next agent converges
        seen = probe_round(lab)
        failures += [f"apply kill {i}, after re-apply: {d}" for d in disagreements(seen, want[nxt])]
        cur = nxt
    # -- stockade run: killed while it applies a change; the restarted one converges
    agent.start()
    converge_wrong: list[str] = []
    probes = 0
    try:
        agent.wait_ready()
        for i in range(kills):
            nxt = "p2" if cur == "p1" else "p1"
            write_atomic(src, worlds[nxt].docs())
            time.sleep(rng.uniform(0.0, max(0.05, span - 0.6)))
            agent.kill()
            seen = probe_round(lab)
            state, why = _classify(seen, want[cur], want[nxt], (dirs[cur], dirs[nxt]))
            outcomes["run"][state] += 1
            failures += [f"run kill {i}: {w}" for w in why]
            # restart with probes running: from the state found (old or new) to new, never a gap
            found = want[nxt] if state == "new" else want[cur]
            prober = Prober(lab)
            with prober.running():
                time.sleep(0.5)
                agent.start()
                agent.restarts += 1
                ready = agent.wait_ready()
                time.sleep(0.8)
            probes += len(prober.probes)
            found_dirs = dirs[nxt] if state == "new" else dirs[cur]
            converge_wrong += judge(prober.probes, [(0.0, found), (ready, want[nxt])],
                                    [Window(0.0, ready, found, want[nxt], found_dirs, dirs[nxt])])
            seen = probe_round(lab)
            failures += [f"run kill {i}, after restart: {d}" for d in disagreements(seen, want[nxt])]
            cur = nxt
    finally:
        agent.stop()
        agent.http.close()
    failures += [f"restart after kill: {w}" for w in converge_wrong]
    return {"kills": 2 * kills, "filler_endpoints": filler, "apply_s": round(span, 2),
            "outcomes": outcomes, "probes_while_restarting": probes,
            "wrong_verdicts": len(failures),
            "cross_endpoint_mixtures": sum("cross-endpoint" in f for f in failures), "failures": failures[:50]}


# ------------------------------------------------------------------ 5. foreign tc filters


FOREIGN = [  # (hook, pref): a u32 filter matching only TEST-NET-1, harmless to lab traffic
    ("ingress", "100"), ("egress", "100"), ("ingress", "40000"),
]


def _tc_filters(lab: Lab, dev: str) -> dict[str, str]:
    return {hook: lab.node_sh("tc", "filter", "show", "dev", dev, hook).stdout for hook in ("ingress", "egress")}


def foreign_tc(lab: Lab, dataplane: str, work: Path) -> dict[str, Any]:
    """tc filters Stockade does not own, on a pod's host veth, survive apply, run, cleanup."""
    build_lab(lab)
    dev = lab.pods["alpha/web"].host_if
    lab.node_sh("tc", "qdisc", "add", "dev", dev, "clsact")
    for hook, pref in FOREIGN[:2]:
        lab.node_sh("tc", "filter", "add", "dev", dev, hook, "pref", pref, "protocol", "ip", "u32",
                    "match", "ip", "dst", "192.0.2.1/32", "classid", "1:1")
    failures: list[str] = []

    def check(step: str) -> None:
        shown = _tc_filters(lab, dev)
        for hook, pref in added:
            if f"pref {pref} u32" not in shown[hook]:
                failures.append(f"after {step}: foreign {hook} filter pref {pref} is gone")
    added = list(FOREIGN[:2])
    agent = _agent(lab, work, dataplane)
    world = base_world()
    write_atomic(agent.src, world.docs())
    res = lab.stockade("apply", "--source", str(agent.src), "--node", NODE, "--dataplane", dataplane,
                       "--state-dir", str(agent.state), check=False)
    if res.returncode != 0:
        failures.append(f"apply failed: {res.stderr[-500:]}")
    check("apply")
    seen = probe_round(lab)
    failures += [f"enforcing next to foreign filters: {d}" for d in disagreements(seen, expected(agent.src))]
    # one more foreign filter added while Stockade's are attached, then the daemon
    lab.node_sh("tc", "filter", "add", "dev", dev, "ingress", "pref", FOREIGN[2][1], "protocol", "ip", "u32",
                "match", "ip", "dst", "192.0.2.2/32", "classid", "1:1")
    added.append(FOREIGN[2])
    agent.start()
    try:
        agent.wait_ready()
        before = agent.syncs()
        world.pod_labels["alpha/web"] = {"app": "web", "role": "back"}
        write_atomic(agent.src, world.docs())
        agent.wait_synced(before)
        check("run")
    finally:
        agent.stop()
        agent.http.close()
    check("run exit")
    res = lab.stockade("cleanup", "--dataplane", dataplane, check=False)
    if res.returncode != 0:
        failures.append(f"cleanup failed: {res.stderr[-500:]}")
    check("cleanup")
    left = _tc_filters(lab, dev)
    if "stockade" in left["ingress"] + left["egress"]:
        failures.append("cleanup left a Stockade filter behind")
    if "clsact" not in lab.node_sh("tc", "qdisc", "show", "dev", dev).stdout:
        failures.append("cleanup removed the foreign clsact qdisc")
    return {"foreign_filters": len(added), "steps": ["apply", "run", "run exit", "cleanup"],
            "wrong_verdicts": len(failures), "failures": failures}


# ------------------------------------------------------------------ 3. fuzz through the directory source


def dir_fuzz(lab: Lab, dataplane: str, work: Path, examples: int, seed: int) -> dict[str, Any]:
    """Hypothesis-generated policies (tests/unit/test_fuzz_kubernetes strategies), some made
    invalid, plus garbage files and half-written files (in place and via rename) while the
    daemon runs: it keeps running, reports every invalid object, never enforces a verdict
    wider than the same input with each invalid object replaced by a valid reading of it
    (tests/unit/test_fuzz_kubernetes: its bad parts matching nothing), and while an in-place writer holds
    the file open (part written) the previous version stays exactly in force."""
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from agent.pipeline import DirectoryPipeline
    from tests.kit.fuzz_kubernetes import MUTATIONS, policies

    build_lab(lab)
    agent = _agent(lab, work, dataplane)
    src = agent.src
    write_atomic(src, base_world().docs())
    agent.start()
    agent.wait_ready()
    figures = {"cases": 0, "probes": 0, "invalid_objects": 0, "garbage_files": 0, "half_written": 0, "wider": 0,
               "unreported": 0, "crashed": 0, "half_written_changed": 0, "valid_only_disagreements": 0}
    failures: list[str] = []

    def sync_after(write: Any) -> None:
        before = agent.syncs()
        write()
        agent.wait_synced(before)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(policies, st.binary(max_size=64), st.floats(0.0, 1.0))
    def case(generated: list, junk: bytes, cut: float) -> None:
        figures["cases"] += 1
        mode = ("in_place", "rename", "json")[figures["cases"] % 3]
        docs_valid, docs_all, bad = [], [], 0
        for i, (spec, ns, mutation) in enumerate(generated):
            doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": f"fz{i}", "namespace": {"a": "alpha", "b": "zeta"}[ns]},
                   "spec": json.loads(json.dumps(spec))}
            if mutation is None:
                docs_valid.append(doc)
            else:  # the reference holds a valid reading of it (bad parts matching nothing)
                docs_valid.append({**doc, "spec": MUTATIONS[mutation](doc["spec"])[0]})
                bad += 1
            docs_all.append(doc)
        figures["invalid_objects"] += bad
        # 1. the valid objects only: the reference
        for old in src.glob("fuzz*"):
            old.unlink()
        (src / "junk.yaml").unlink(missing_ok=True)
        sync_after(lambda: write_atomic(src, docs_valid, "fuzz.yaml"))
        ref = expected(src)
        seen = probe_round(lab)
        figures["probes"] += len(seen)
        wrong = disagreements(seen, ref)
        figures["valid_only_disagreements"] += len(wrong)
        if wrong:  # still wrong a second later? tells a late sync from a lasting error
            time.sleep(1.0)
            later = "lasting" if disagreements(probe_round(lab), ref) else "gone 1 s later"
            failures.extend(f"case {figures['cases']} valid-only ({later}): {d}" for d in wrong)
        # 2. everything, invalid objects and a garbage file included, written per `mode`
        text = json.dumps({"kind": "List", "items": docs_all}) if mode == "json" else dump_manifests(docs_all)
        name = "fuzz.json" if mode == "json" else "fuzz.yaml"
        target = src / name
        if mode == "in_place":  # truncate, write part, pause (the daemon syncs), write the rest
            figures["half_written"] += 1
            part = text[: int(len(text) * cut)]
            was_empty = target.stat().st_size == 0
            with open(target, "w") as f:
                before = agent.syncs()
                f.write(part)
                f.flush()
                if part or not was_empty:  # a write or truncation: the daemon syncs on it
                    agent.wait_synced(before)
                # The writer still holds the file open: its previous version must stay.
                mid = probe_round(lab)
                figures["probes"] += len(mid)
                changed = disagreements(mid, ref)
                figures["half_written_changed"] += len(changed)
                failures.extend(f"case {figures['cases']} half-written ({len(part)}/{len(text)} bytes, held "
                                f"open): {d}" for d in changed)
                before = agent.syncs()
                f.write(text[len(part):])
            agent.wait_synced(before)  # the close is an event of its own
        else:
            if (src / "fuzz.yaml").exists() and name != "fuzz.yaml":
                (src / "fuzz.yaml").unlink()
            staging = src.parent / "src.staging"
            staging.mkdir(exist_ok=True)
            (staging / name).write_text(text)
            sync_after(lambda: (staging / name).rename(target))
        figures["garbage_files"] += 1
        sync_after(lambda: (src / "junk.yaml").write_bytes(junk))
        if not agent.alive():
            figures["crashed"] += 1
            failures.append(f"case {figures['cases']}: the daemon died")
            agent.start()
            agent.wait_ready()
            return
        seen = probe_round(lab)
        figures["probes"] += len(seen)
        for k, ok in seen.items():
            if ok and not ref[k]:
                figures["wider"] += 1
                failures.append(f"case {figures['cases']} ({mode}): {k[0]}->{k[1]} {k[2]}/{k[3]} passed, "
                                "valid-only denies it")
        problems = DirectoryPipeline(src, None, None, readonly=True).snapshot().problems
        reported = {p.ref.name for p in problems}
        want_bad = {d["metadata"]["name"] for d in docs_all if d not in docs_valid}
        if not want_bad <= reported:
            figures["unreported"] += len(want_bad - reported)
            failures.append(f"case {figures['cases']}: not reported: {sorted(want_bad - reported)}")
        _, body = agent.http.get("/metrics")
        gauge = next((float(line.split()[-1]) for line in body.splitlines()
                      if line.startswith("stockade_invalid_objects ")), None)
        if gauge != len(problems):
            failures.append(f"case {figures['cases']}: stockade_invalid_objects={gauge}, simulator reports "
                            f"{len(problems)}")

    try:
        case()
    finally:
        agent.stop()
        agent.http.close()
    figures["wrong_verdicts"] = figures["wider"] + figures["valid_only_disagreements"] + figures["half_written_changed"]
    figures["failures"] = failures[:50]
    return figures
