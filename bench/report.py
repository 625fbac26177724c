"""Tables from a bench result (also usable on a saved JSON: python -m bench.report FILE)."""

from __future__ import annotations

import json
import sys
from typing import Any

from bench.control import EVENT_KINDS as KINDS


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}" if x >= 0.1 else f"{x * 1000:.1f}"


def control_line(dp: str, size: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"  {dp} {size}: ERROR {r['error'][-300:]}"
    c = r["cold"]
    fl = (r.get("floor") or {}).get("nft_f_s") or (r.get("floor") or {}).get("update_s")
    inc = r.get("incremental", {}).get("pod_labels", {}).get("total_s", {})
    return (f"  {dp} {size}: compile {_ms(c['compile_s'])} ms, apply {_ms(c['apply_s'])} ms, floor "
            f"{_ms(fl)} ms, peak RSS {r['peak_rss_mb']:.0f} MB, pod label median {_ms(inc.get('median'))} ms"
            f" (n={inc.get('n')}), scrape {_ms(r['scrape']['median_s'])} ms, wall {r.get('wall_s', 0):.0f} s")


def _table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]

    def line(r: list[str]) -> str:
        return "  ".join(str(x).rjust(n) if i else str(x).ljust(n) for i, (x, n) in enumerate(zip(r, w, strict=False)))

    return "\n".join([line(head), line(["-" * n for n in w]), *map(line, rows)])


def control_table(ctrl: dict[str, Any]) -> str:
    head = ["dataplane/size", "eps", "elems", "compile", "apply", "sum", "floor", "apply/floor", "CPU c+a/floor",
            "peak RSS"]
    for k in KINDS:
        head.append(f"{k} p50/p99 (n)")
    head.append("scrape")
    rows = []
    for key, r in ctrl.items():
        if "error" in r:
            rows.append([key, "ERROR: " + r["error"].splitlines()[-1][:80]] + [""] * (len(head) - 2))
            continue
        c = r["cold"]
        fl = r.get("floor") or {}
        floor_s = fl.get("nft_f_s") if "nft_f_s" in fl else fl.get("update_s")
        ratio = f"{c['apply_s'] / floor_s:.2f}" if floor_s else "-"
        obj = r["program"]["objects"]
        elems = obj.get("set_elements", obj.get("peers", "")) if obj else ""
        cpu = (f"{_ms(c.get('compile_cpu_s'))}+{_ms(c.get('apply_cpu_s'))}/{_ms(fl.get('nft_f_cpu_s'))}"
               if "compile_cpu_s" in c else "-")
        row = [key + (" *" if r.get("sizes_override") else ""), str(r["program"]["local_endpoints"]),
               str(elems), _ms(c["compile_s"]), _ms(c["apply_s"]), _ms(c["sum_s"]), _ms(floor_s), ratio, cpu,
               f"{r['peak_rss_mb']:.0f} MB"]
        for k in KINDS:
            t = r.get("incremental", {}).get(k, {}).get("total_s", {})
            e = r.get("incremental", {}).get(k, {}).get("error")
            row.append(f"{_ms(t.get('median'))}/{_ms(t.get('p99'))} ({t.get('n')})" if t.get("n")
                       else ("error" if e else "-"))
        row.append(_ms(r["scrape"]["median_s"]) + f" ({r['scrape']['objects'].get('rules', '?')} rules)")
        rows.append(row)
    notes = [f"  * {k}: default map sizes refused the cluster ({r['default_sizes_error']}); "
             f"figures with {r['sizes_override']}" for k, r in ctrl.items() if r.get("sizes_override")]
    return ("Control plane (times in ms; floor = `nft -f` of the same ruleset in a fresh netns, "
            "or raw bpf(2) map updates for eBPF)\n" + _table(head, rows) + ("\n" + "\n".join(notes) if notes else ""))


def datapath_table(dpr: dict[str, Any]) -> str:
    from bench.datapath import METRICS

    head = ["dataplane", "peers"] + [f"{m}" for m in METRICS]
    rows = []
    for dp, r in dpr.get("dataplanes", {}).items():
        if "error" in r:
            rows.append([dp, "ERROR", r["error"][:100]] + [""] * (len(head) - 3))
            continue
        rows.append([dp, "floor"] + [f"{r['floor'][m]['median']:.4g} [{r['floor'][m]['min']:.4g}-"
                                      f"{r['floor'][m]['max']:.4g}]" for m in METRICS])
        for name, cfg in r["configs"].items():
            rows.append([dp, name] + [f"{cfg[m]['ratio']['median']:.2f} [{cfg[m]['ratio']['min']:.2f}-"
                                      f"{cfg[m]['ratio']['max']:.2f}]" for m in METRICS])
    return ("Datapath (floor: absolute median [min-max]; policies: ratio to the floor median "
            "[min-max]; >1 is worse for rr_p50/p99)\n" + _table(head, rows))


def events_table(ev: dict[str, Any]) -> str:
    """End-to-end event latency by packets (bench/events.py), the floor beside each kind."""
    from bench.events import KINDS as E2E_KINDS

    head = ["dataplane/size", "start->ready"]
    for k in E2E_KINDS:
        head += [f"{k} p50/p99 (n)", "allow/deny p50"]
    head.append("floor p50/p99 (n)")
    rows = []
    for key, r in ev.items():
        if "error" in r:
            rows.append([key, "ERROR: " + r["error"].splitlines()[-1][:100]] + [""] * (len(head) - 2))
            continue
        row = [key, f"{r['start_to_ready_s']:.2f} s"]
        for k in E2E_KINDS:
            e = r["events"][k]
            d = r["by_direction"]
            missed = f", {e['missed']} missed" if e["missed"] else ""
            row += [f"{_ms(e['median'])}/{_ms(e['p99'])} ({e['n']}{missed})",
                    f"{_ms(d[k + '/allow']['median'])}/{_ms(d[k + '/deny']['median'])}"]
        fl = r.get("floor") or {}
        row.append(f"{_ms(fl.get('median'))}/{_ms(fl.get('p99'))} ({fl.get('n', '-')})" if fl else "-")
        rows.append(row)
    return ("Events end to end by packets (ms; source file renamed in -> first probe with the new verdict, "
            "1 ms probes; floor = one libnftables element command, same probes)\n" + _table(head, rows))


def startup_table(st: dict[str, Any]) -> str:
    """Cold start and restart -> ready (bench/startup.py)."""
    head = ["dataplane/size", "cold p50 [min-max] (n)", "restart p50 [min-max] (n)", "wrong/probes in restarts",
            "verdicts", "eBPF build compile (untimed)"]
    rows = []
    for key, r in st.items():
        if "error" in r:
            rows.append([key, "ERROR: " + r["error"].splitlines()[-1][:100]] + [""] * (len(head) - 2))
            continue

        def fig(f: dict[str, Any]) -> str:
            return (f"{f['median']:.2f} s [{f['min']:.2f}-{f['max']:.2f}] ({f['n']})" if f["n"] else "-")

        p = r["restart_probes"]
        bad, comp = p["friend_denied"] + p["client_allowed"], r.get("compile_s")
        rows.append([key, fig(r["cold_s"]), fig(r["restart_s"]), f"{bad}/{p['total']}",
                     "hold" if r["cold_verdicts_ok"] and r["restart_verdicts_ok"] else "WRONG",
                     f"{max(comp):.1f} s, reused {'yes' if r.get('build_reused') else 'NO'}" if comp else "-"])
    return ("Startup (process start -> /readyz 200; cold: no table, no pinned maps, no state file, eBPF build "
            "compiled before; restart: SIGKILL then start, everything adopted; probes every 5 ms per client)\n"
            + _table(head, rows))


def targets(result: dict[str, Any]) -> str:
    rows = []
    ctrl = result.get("control", {})
    dpr = result.get("datapath", {}).get("dataplanes", {})

    def add(name: str, value: str, ok: bool | None) -> None:
        rows.append([name, value, "-" if ok is None else ("met" if ok else "NOT MET")])

    for dp, lim_udp, lim_crr in (("ebpf", 0.93, 0.90), ("ebpf:peer", 0.93, 0.90), ("nftables", 0.85, 0.85)):
        cfg = dpr.get(dp, {}).get("configs", {}).get("100000")
        if cfg:
            u, c = cfg["udp64_kpps"]["ratio"]["median"], cfg["crr_per_s"]["ratio"]["median"]
            add(f"{dp} 100k peers UDP64 >= {lim_udp}", f"{u:.2f}", u >= lim_udp)
            add(f"{dp} 100k peers new conns >= {lim_crr}", f"{c:.2f}", c >= lim_crr)
            for m in ("tcp_gbps", "rr_p50_us", "rr_p99_us"):
                fl = dpr[dp]["floor"][m]
                lo, hi = fl["min"] / fl["median"], fl["max"] / fl["median"]
                v = cfg[m]["ratio"]["median"]
                add(f"{dp} 100k peers {m} within floor noise", f"{v:.2f} (floor {lo:.2f}-{hi:.2f})",
                    min(lo, 0.9) <= v <= max(hi, 1.1))
    for dp in ("nftables", "ebpf"):
        r = ctrl.get(f"{dp}/10k")
        if not r or "error" in r:
            continue
        c = r["cold"]
        add(f"{dp} 10k cold compile+apply <= 2 s", f"{c['sum_s']:.2f} s", c["sum_s"] <= 2)
        fl = (r.get("floor") or {}).get("nft_f_s") or (r.get("floor") or {}).get("update_s")
        if fl:
            add(f"{dp} 10k apply <= 1.5x floor", f"{c['apply_s'] / fl:.2f}x", c["apply_s"] / fl <= 1.5)
        t = r["incremental"]["pod_labels"]["total_s"]
        if t.get("n"):
            add(f"{dp} 10k pod label -> kernel p50 <= 20 ms", f"{t['median'] * 1000:.0f} ms (n={t['n']})",
                t["median"] <= 0.02)
            add(f"{dp} 10k pod label -> kernel p99 <= 100 ms", f"{t['p99'] * 1000:.0f} ms", t["p99"] <= 0.1)
        add(f"{dp} RSS 10k <= 150 MB", f"{r['peak_rss_mb']:.0f} MB", r["peak_rss_mb"] <= 150)
        r50 = ctrl.get(f"{dp}/50k")
        if r50 and "error" not in r50:
            add(f"{dp} RSS 50k <= 500 MB", f"{r50['peak_rss_mb']:.0f} MB", r50["peak_rss_mb"] <= 500)
    for key, r in result.get("events", {}).items():
        dp, size = key.split("/")
        lim = {"10k": (0.02, 0.1, 0.02, 0.05), "50k": (0.05, 0.2, 0.05, 0.1)}.get(size)
        if lim is None or "error" in r:
            continue
        e, d = r["events"], r["by_direction"]
        if e["pod_labels"]["n"]:
            add(f"{dp} {size} pod labels -> packets p50 <= {lim[0] * 1000:.0f} ms",
                f"{_ms(e['pod_labels']['median'])} ms (n={e['pod_labels']['n']})", e["pod_labels"]["median"] <= lim[0])
            add(f"{dp} {size} pod labels -> packets p99 <= {lim[1] * 1000:.0f} ms",
                f"{_ms(e['pod_labels']['p99'])} ms", e["pod_labels"]["p99"] <= lim[1])
        if d["pod_ip/allow"]["n"]:
            add(f"{dp} {size} new pod IP -> packets p50 <= {lim[2] * 1000:.0f} ms",
                f"{_ms(d['pod_ip/allow']['median'])} ms", d["pod_ip/allow"]["median"] <= lim[2])
        if d["policy_added/allow"]["n"]:
            add(f"{dp} {size} policy added -> packets p50 <= {lim[3] * 1000:.0f} ms",
                f"{_ms(d['policy_added/allow']['median'])} ms", d["policy_added/allow"]["median"] <= lim[3])
    for key, r in result.get("startup", {}).items():
        dp, size = key.split("/")
        lim = {"10k": 2.0, "50k": 10.0}.get(size)
        if lim is None or "error" in r:
            continue
        for name, f in (("cold start", r["cold_s"]), ("restart", r["restart_s"])):
            if f["n"]:
                add(f"{dp} {size} {name} -> ready p50 <= {lim:.0f} s", f"{f['median']:.2f} s (n={f['n']})",
                    f["median"] <= lim)
        p = r["restart_probes"]
        bad = p["friend_denied"] + p["client_allowed"]
        add(f"{dp} {size} wrong verdicts during restart = 0", f"{bad}/{p['total']}", bad == 0)
    s = ctrl.get("nftables/scrape")
    if s and "error" not in s:
        add(f"/metrics scrape at {s['scrape']['objects'].get('rules')} rules <= 100 ms",
            f"{s['scrape']['median_s'] * 1000:.0f} ms", s["scrape"]["median_s"] <= 0.1)
    return "Targets (issue 7)\n" + _table(["target", "measured", ""], rows)


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    parts = [f"Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, {m['memory_mb']} MB; "
             f"commit {m['commit'][:12]}{' (dirty)' if m['dirty'] else ''}"]
    if result.get("ebpf_skipped"):
        parts.append(f"eBPF skipped: {result['ebpf_skipped']}")
    if "control" in result:
        parts.append(control_table(result["control"]))
    if result.get("events"):
        parts.append(events_table(result["events"]))
    if result.get("startup"):
        parts.append(startup_table(result["startup"]))
    if "datapath" in result:
        parts.append(datapath_table(result["datapath"]))
    parts.append(targets(result))
    return "\n\n".join(parts)


if __name__ == "__main__":
    from pathlib import Path

    print(render(json.loads(Path(sys.argv[1]).read_text())))
