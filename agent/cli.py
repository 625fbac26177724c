"""stockade run | apply | compile | explain | matrix | counters | drops | cleanup: arguments and printing.

What the commands compute lives in agent.query (questions) and agent.daemon (enforcement).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.daemon import enforce
from agent.dataplane.base import Dataplane, DataplaneError
from agent.drops import drop_text
from agent.endpoint import ListenAddress
from agent.metrics import counter_text
from agent.pipeline import DirectoryPipeline, Pipeline, Snapshot
from agent.query import (
    DataplaneOptions,
    QueryError,
    explain,
    make_dataplane,
    matrix,
    merge_learned,
    to_name,
    to_name_text,
)
from agent.query import counters as counter_table

log = logging.getLogger("stockade")

DEFAULT_SOURCE = "/etc/stockade/manifests"
DEFAULT_STATE_DIR = "/var/lib/stockade"
DEFAULT_METRICS = "127.0.0.1:9754"
EXIT_INVALID = 2  # applied everything valid, but some objects were rejected


def _protocol(text: str) -> str:
    p = text.upper()
    if p not in ("TCP", "UDP", "SCTP"):
        raise argparse.ArgumentTypeError(f"protocol must be TCP, UDP or SCTP, got {text!r}")
    return p


def _flow_protocol(text: str) -> str:
    """explain also takes ICMP (NetBird rules can allow it)."""
    return "ICMP" if text.upper() == "ICMP" else _protocol(text)


def _listen_address(env: str) -> Callable[[str], ListenAddress]:
    """argparse type of a HOST:PORT flag whose default comes from `env`."""

    def parse(text: str) -> ListenAddress:
        try:
            return ListenAddress.parse(text)
        except ValueError as e:
            origin = f" (from ${env})" if os.environ.get(env) == text else ""
            raise argparse.ArgumentTypeError(f"{e}{origin}") from None

    return parse


def _dataplane(name: str, args: argparse.Namespace | None = None) -> Dataplane:
    if getattr(args, "ebpf_mark", None) is not None:  # read by the eBPF dataplane (its `config` map)
        os.environ["STOCKADE_EBPF_MARK"] = hex(args.ebpf_mark)
    if getattr(args, "ebpf_deliver", None) is not None:
        os.environ["STOCKADE_EBPF_DELIVER"] = args.ebpf_deliver
    options = DataplaneOptions(audit=getattr(args, "mode", "enforce") == "audit",
                               guard_unknown=getattr(args, "unknown_endpoints", "allow") == "deny")
    try:
        return make_dataplane(name, options)
    except QueryError as e:
        raise SystemExit(f"stockade: {e}") from None


def _mark_bit(text: str) -> int:
    from agent.dataplane.ebpf.layout import parse_mark

    try:
        return parse_mark(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _node(args: argparse.Namespace) -> str:
    return args.node or os.environ.get("NODE_NAME") or socket.gethostname()


def _state_file(args: argparse.Namespace) -> Path | None:
    if not args.state_dir:
        return None
    return Path(args.state_dir) / "last-good.json"


def _netbird_pipeline(args: argparse.Namespace, readonly: bool) -> Pipeline:
    from agent.pipeline import make_netbird_pipeline
    from agent.sources.netbird import TokenError

    try:
        return make_netbird_pipeline(
            args.netbird_url, args.netbird_token_file, args.netbird_ca_file,
            peer_id=args.netbird_peer_id, interface=args.interface, interval=args.netbird_interval,
            inbound_only=args.netbird_inbound_only,
            # The simulator reads the enforcer's admitted state (same last good versions,
            # same verdicts) and never writes it.
            state_file=None if not args.state_dir else Path(args.state_dir) / "netbird.json",
            readonly=readonly,
        )
    except (TokenError, ValueError) as e:
        raise SystemExit(f"stockade: {e}") from None


def _kubernetes_pipeline(args: argparse.Namespace, node: str | None, readonly: bool) -> Pipeline:
    from agent.pipeline import KubernetesPipeline

    guard = getattr(args, "unknown_endpoints", "allow") == "deny" and node is not None
    try:
        return KubernetesPipeline(
            node, readonly=readonly,
            # The API server is the durable store: no state file (it would rewrite the
            # whole cluster on every change); last-good versions are kept in memory.
            state_file=None,
            kubeconfig=args.kubeconfig, pod_cidrs=args.pod_cidr or None,
            want_pod_cidrs=guard and not args.pod_cidr, guard_unknown=guard,
        )
    except Exception as e:  # kubeconfig missing/invalid: say so instead of a traceback
        raise SystemExit(f"stockade: cannot configure the Kubernetes client: {e}") from None


def _pipeline(args: argparse.Namespace, node: str | None, readonly: bool = False) -> Pipeline:
    if args.source == "netbird":
        return _netbird_pipeline(args, readonly)
    if args.source == "kubernetes":
        return _kubernetes_pipeline(args, node, readonly)
    if not Path(args.source).exists():
        raise SystemExit(f"stockade: source directory {args.source} does not exist")
    return DirectoryPipeline(args.source, node, _state_file(args), readonly=readonly)


def _report(snap: Snapshot) -> None:
    for p in snap.problems:
        log.warning("invalid input (last good version kept, else read fail-closed): %s", p)


# ------------------------------------------------------------------ simulator


def _agent_json(agent: ListenAddress, path: str) -> Any:
    """GET a JSON answer of the running agent; OSError (HTTP errors included) when it cannot."""
    with urllib.request.urlopen(f"http://{agent.client()}{path}", timeout=5) as resp:
        return json.load(resp)


def cmd_explain_name(args: argparse.Namespace, snap: Snapshot) -> int:
    """`explain --to-name`: the rules from the source, the learned addresses from the agent."""
    try:
        rows = to_name(snap, args.to_name, args.from_)
    except QueryError as e:
        raise SystemExit(f"stockade: {e}") from None
    note = None
    try:
        view = _agent_json(args.agent, "/dns")
        if not view.get("enabled"):
            note = f"the agent at {args.agent.client()} does not learn: it runs without --dns-egress"
        rows = merge_learned(rows, view)
    except urllib.error.HTTPError as e:
        note = f"the agent at {args.agent.client()} refused: {e.code} {e.read(200).decode(errors='replace').strip()}"
    except (OSError, ValueError) as e:
        note = f"cannot reach the agent at {args.agent.client()}: {e}"
    if args.output == "json":
        print(json.dumps({"name": args.to_name, "agent_error": note, "rules": rows}, indent=2))
    else:
        print("\n".join(to_name_text(args.to_name, rows, note)))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    snap = _pipeline(args, None, readonly=True).snapshot()
    _report(snap)
    if args.to_name is not None:
        return cmd_explain_name(args, snap)
    if args.from_ is None:
        raise SystemExit("stockade: explain --to needs --from")
    try:
        ex = explain(snap, args.from_, args.to, args.protocol, args.port)
    except QueryError as e:
        raise SystemExit(f"stockade: {e}") from None
    if args.output == "json":
        print(json.dumps(ex.to_json(), indent=2))
        return 0
    flow = args.protocol if ex.port is None else f"{args.protocol}/{ex.port}"
    verdict = "ALLOW" if ex.allowed else "DENY"
    print(f"{verdict}: {args.from_} ({ex.src}) -> {args.to} ({ex.dst}) {flow}")
    if ex.src == ex.dst:
        print("  same address: traffic never leaves the pod")
    for label, d, who in (("egress ", ex.flow.egress, args.from_), ("ingress", ex.flow.ingress, args.to)):
        if d is None:
            print(f"  {label} of {who}: not a pod here, not judged")
        else:
            print(f"  {label} of {d.endpoint}: {d.reason}")
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    snap = _pipeline(args, None, readonly=True).snapshot()
    _report(snap)
    family = {"ipv4": 4, "ipv6": 6}.get(args.family or "")
    verdicts = matrix(snap, args.port, args.protocol, family)
    if args.output == "json":
        print(json.dumps({"port": args.port, "protocol": args.protocol, "verdicts": verdicts}))
        return 0
    keys = list(verdicts)
    width = max([len(k) for k in keys] + [8])
    print(f"{args.protocol}/{args.port}: rows are sources, columns destinations (. allow, X deny)")
    for i, k in enumerate(keys):
        print(f"{'':>{width}}  {'|  ' * i}{k}")
    for s in keys:
        cells = "  ".join("." if verdicts[s][d] == "allow" else "X" for d in keys)
        print(f"{s:>{width}}  {cells}")
    return 0


# ------------------------------------------------------------------ enforcer


def cmd_compile(args: argparse.Namespace) -> int:
    snap = _pipeline(args, _node(args), readonly=True).snapshot()
    _report(snap)
    sys.stdout.write(_dataplane(args.dataplane, args).render(snap.program))
    return EXIT_INVALID if snap.problems else 0


def cmd_apply(args: argparse.Namespace) -> int:
    snap = _pipeline(args, _node(args)).snapshot()
    _report(snap)
    dp = _dataplane(args.dataplane, args)
    try:
        stats, _ = enforce(dp, snap.program, strict=not args.keep_established)
    except DataplaneError as e:
        log.error("%s", e)
        return 1
    log.info("applied %d endpoints on node %s (%d commands)", len(snap.program.endpoints),
             _node(args), stats.commands)
    return EXIT_INVALID if snap.problems else 0


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import Daemon
    from agent.endpoint import serve_http

    pipe = _pipeline(args, _node(args))
    daemon = Daemon(pipe, _dataplane(args.dataplane, args), resync=args.resync,
                    strict=not args.keep_established, debounce=args.debounce)
    daemon.install_signal_handlers()
    dns = None
    if args.dns_egress:  # experimental: learns domainNames addresses from held DNS answers
        from agent.dns.egress import DnsEgress

        dns = DnsEgress(daemon, fail_closed=args.dns_fail_closed, floor=max(0, args.dns_ttl_floor))
        dns.start()
    # Never fatal: a taken port is retried in the background while the kernel is enforced.
    server = serve_http(daemon, args.metrics_address, drops_public=args.drops_public)
    log.info("stockade %s enforcing %s on node %s with %s; http on %s", __version__,
             args.source, _node(args), args.dataplane, args.metrics_address)
    try:
        daemon.run()
    finally:
        server.close()
        if dns is not None:
            dns.close()
    return 0


def cmd_counters(args: argparse.Namespace) -> int:
    """Kernel counters of every rule and default deny, labelled with their policy."""
    snap = _pipeline(args, _node(args), readonly=True).snapshot()
    rows = counter_table(snap, _dataplane(args.dataplane))
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(counter_text(r))
    return 0


def _print_drop(d: dict[str, Any]) -> None:
    print(drop_text(d), flush=True)


def cmd_drops(args: argparse.Namespace) -> int:
    """Recent drops sampled by the running agent, with the policies that decided."""
    agent = args.agent.client()  # a wildcard listener is reached on loopback
    url = f"http://{agent}/drops?since="
    seq = 0
    while True:
        try:
            with urllib.request.urlopen(url + str(seq), timeout=5) as resp:
                drops = json.load(resp)
        except urllib.error.HTTPError as e:
            detail = e.read(200).decode(errors="replace").strip()
            raise SystemExit(f"stockade: the agent at {agent} refused: {e.code} {detail}") from None
        except OSError as e:
            raise SystemExit(f"stockade: cannot reach the agent at {agent}: {e}") from None
        for d in drops:
            seq = max(seq, d["seq"])
            if args.output == "json":
                print(json.dumps(d), flush=True)
            else:
                _print_drop(d)
        if not args.follow:
            return 0
        time.sleep(0.5)


def cmd_cleanup(args: argparse.Namespace) -> int:
    try:
        _dataplane(args.dataplane).cleanup()
    except DataplaneError as e:
        log.error("%s", e)
        return 1
    try:  # the DNS answer hold's filters (--dns-egress), whichever dataplane ran
        from agent.dns.hold import remove_filters

        remove_filters()
    except Exception as e:
        log.warning("could not remove the DNS answer hold's tc filters: %s", e)
    return 0


# ------------------------------------------------------------------ parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stockade", description="Per-node network-policy enforcer")
    p.add_argument("--version", action="version", version=f"stockade {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, node: bool = True, dataplane: bool = True) -> None:
        sp.add_argument("--source", default=os.environ.get("STOCKADE_SOURCE", DEFAULT_SOURCE),
                        help="a manifest directory, `kubernetes` or `netbird` "
                             "(default: $STOCKADE_SOURCE or %(default)s)")
        k8s = sp.add_argument_group("Kubernetes API source (--source kubernetes)")
        k8s.add_argument("--kubeconfig", default=None,
                         help="kubeconfig file (default: $KUBECONFIG, then in-cluster, then ~/.kube/config)")
        k8s.add_argument("--pod-cidr", action="append", type=ipaddress.ip_network,
                         help="this node's pod CIDR (repeatable; default: node.spec.podCIDRs)")
        if dataplane:
            k8s.add_argument("--unknown-endpoints", choices=["allow", "deny"], default="allow",
                             help="deny: drop traffic of local pod-CIDR addresses no source reported yet")
        nb = sp.add_argument_group("NetBird source (--source netbird)")
        nb.add_argument("--netbird-url", default=os.environ.get("NETBIRD_URL", "https://api.netbird.io"))
        nb.add_argument("--netbird-token-file", default=os.environ.get("NETBIRD_TOKEN_FILE"),
                        help="file holding the API token (mode 0600); else $NETBIRD_TOKEN")
        nb.add_argument("--netbird-ca-file", default=os.environ.get("NETBIRD_CA_FILE"),
                        help="CA bundle for a self-hosted management server")
        nb.add_argument("--netbird-peer-id", default=os.environ.get("NETBIRD_PEER_ID"),
                        help="this peer's id (default: found by the interface's address)")
        nb.add_argument("--interface", default=os.environ.get("NETBIRD_INTERFACE", "wt0"))
        nb.add_argument("--netbird-interval", type=float, default=30.0, help="poll period in seconds")
        nb.add_argument("--netbird-inbound-only", action="store_true",
                        help="enforce inbound only, as NetBird's own client does")
        sp.add_argument("--state-dir", default=os.environ.get("STOCKADE_STATE_DIR", DEFAULT_STATE_DIR),
                        help="where the last good version of each object is kept ('' to disable)")
        if node:
            sp.add_argument("--node", help="this node's name (default: $NODE_NAME, then host name)")
        if dataplane:
            sp.add_argument("--dataplane", default="nftables", choices=["nftables", "ebpf"])
            sp.add_argument("--keep-established", action="store_true",
                            help="do not cut established flows a policy change no longer allows")
            sp.add_argument("--mode", choices=["enforce", "audit"], default="enforce",
                            help="audit: program everything, drop nothing, count and log would-be drops")
            sp.add_argument("--ebpf-mark", type=_mark_bit, default=None,
                            help="eBPF: the skb mark bit a pod's hook sets on packets it vouches for to "
                                 "another local pod's hook (one bit, 0: off; default $STOCKADE_EBPF_MARK "
                                 "or 0x1000; not 0x4000/0x8000 of kube-proxy nor Calico's 0xffff0000)")
            sp.add_argument("--ebpf-deliver", choices=["stack", "peer"], default=None,
                            help="eBPF: how a packet between two local pods, judged for both at the source, "
                                 "reaches the destination: through the node's forwarding (stack), or straight "
                                 "into its pod's namespace, past the node's netfilter (peer; see README); "
                                 "default $STOCKADE_EBPF_DELIVER or stack")

    sp = sub.add_parser("matrix", help="verdict for every ordered pair of pods")
    common(sp, node=False, dataplane=False)
    sp.add_argument("--port", required=True, help="number or named port")
    sp.add_argument("--protocol", type=_protocol, default="TCP")
    sp.add_argument("--family", choices=["ipv4", "ipv6"], help="address family (default: primary IP)")
    sp.add_argument("--output", choices=["table", "json"], default="table")
    sp.set_defaults(func=cmd_matrix)

    sp = sub.add_parser("explain", help="verdict for one flow and why")
    common(sp, node=False, dataplane=False)
    sp.add_argument("--from", dest="from_", metavar="NS/POD|IP", help="required with --to")
    to = sp.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", metavar="NS/POD|IP")
    to.add_argument("--to-name", metavar="NAME",
                    help="a DNS name: the domainNames rules selecting it, per pod (--from: that pod only), "
                         "and the addresses the running agent learned for them")
    sp.add_argument("--agent", default=os.environ.get("STOCKADE_METRICS_ADDRESS", DEFAULT_METRICS),
                    type=_listen_address("STOCKADE_METRICS_ADDRESS"),
                    help="with --to-name: the running agent's metrics address (default %(default)s)")
    sp.add_argument("--port", help="number or named port (omit for ICMP)")
    sp.add_argument("--protocol", type=_flow_protocol, default="TCP")
    sp.add_argument("--output", choices=["text", "json"], default="text")
    sp.set_defaults(func=cmd_explain)

    sp = sub.add_parser("compile", help="print what would be programmed; touches nothing")
    common(sp)
    sp.set_defaults(func=cmd_compile)

    sp = sub.add_parser("apply", help="reconcile the kernel once")
    common(sp)
    sp.set_defaults(func=cmd_apply)

    sp = sub.add_parser("run", help="the daemon: watch the source and keep the kernel in sync")
    common(sp)
    sp.add_argument("--metrics-address", default=os.environ.get("STOCKADE_METRICS_ADDRESS", DEFAULT_METRICS),
                    type=_listen_address("STOCKADE_METRICS_ADDRESS"), metavar="HOST:PORT",
                    help="IP:PORT ([IPv6]:PORT) for /metrics, /healthz, /readyz, /drops "
                         f"(default: $STOCKADE_METRICS_ADDRESS or {DEFAULT_METRICS})")
    sp.add_argument("--drops-public", action="store_true",
                    help="answer /drops (flows and pod names) to any client, not only loopback ones")
    sp.add_argument("--resync", type=float, default=60.0, help="full resync period in seconds")
    sp.add_argument("--debounce", type=float, default=0.02,
                    help="seconds to gather a burst of source events into one sync (default %(default)s)")
    sp.add_argument("--dns-egress", action="store_true",
                    help="experimental: enforce ClusterNetworkPolicy domainNames by holding each UDP DNS answer "
                         "to a local pod until the addresses it gives are in the kernel (eBPF tc + TAP)")
    sp.add_argument("--dns-fail-closed", action="store_true",
                    help="with --dns-egress: while the agent is down, drop DNS answers instead of passing them")
    sp.add_argument("--dns-ttl-floor", type=int, default=60, metavar="SECONDS",
                    help="with --dns-egress: keep a learned address at least this long (default %(default)s)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("counters", help="kernel counters per rule and default deny")
    common(sp)
    sp.add_argument("--output", choices=["text", "json"], default="text")
    sp.set_defaults(func=cmd_counters)

    sp = sub.add_parser("drops", help="recent drops and the policies that decided them")
    sp.add_argument("--agent", default=os.environ.get("STOCKADE_METRICS_ADDRESS", DEFAULT_METRICS),
                    type=_listen_address("STOCKADE_METRICS_ADDRESS"), metavar="HOST:PORT",
                    help="the running agent's metrics address; 0.0.0.0 or [::] mean loopback "
                         f"(default: $STOCKADE_METRICS_ADDRESS or {DEFAULT_METRICS})")
    sp.add_argument("--follow", "-f", action="store_true", help="keep printing new drops")
    sp.add_argument("--output", choices=["text", "json"], default="text")
    sp.set_defaults(func=cmd_drops)

    sp = sub.add_parser("cleanup", help="remove everything stockade put in the kernel")
    sp.add_argument("--dataplane", default="nftables", choices=["nftables", "ebpf"])
    sp.set_defaults(func=cmd_cleanup)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = logging.WARNING if args.command in ("matrix", "explain", "compile", "counters", "drops") else logging.INFO
    if args.verbose:
        level = logging.DEBUG if args.verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
