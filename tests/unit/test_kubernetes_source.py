"""The Kubernetes API source against a fake API server, driven by the real `kubernetes` client.

The fake server (tests/kit/kubeapi.py) speaks the list/watch protocol over
HTTP on 127.0.0.1; the client reaches it through a generated kubeconfig. No kernel,
no privileges: the kernel side is the recording dataplane below, or the simulator.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.pipeline import DirectoryPipeline, KubernetesPipeline, PipelineError, SourceNotSynced
from agent.query import matrix
from agent.sources.backoff import Backoff
from agent.sources.kubeobjects import KINDS
from agent.sources.kubernetes import RESOURCES, KubernetesSource, api_client
from tests.kit import expect
from tests.kit.builders import ns, pod, policy
from tests.kit.cases import expected_grid, load_cases, off_diagonal, pod_keys, step_objects, write_dir
from tests.kit.kubeapi import TOKEN, FakeKubeAPI
from tests.kit.recording import RecordingDataplane

pytest.importorskip("kubernetes")

FAST = {"backoff_base": 0.05, "backoff_cap": 0.4, "connect_timeout": 2.0, "read_slack": 2.0}
WATCHES = len(KINDS)  # one watch per kind (the fake serves every CRD unless told otherwise)


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    server = FakeKubeAPI().start()
    yield server
    server.close()


@pytest.fixture
def make_source(api: FakeKubeAPI, tmp_path: Path) -> Iterator[Callable[..., KubernetesSource]]:
    stops: list[Callable[[], None]] = []

    def make(watch: bool = True, on_change: Callable[[], None] | None = None, **kw: Any) -> KubernetesSource:
        src = KubernetesSource(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")), **{**FAST, **kw})
        if watch:
            stops.append(src.watch(on_change or (lambda: None)))
        return src

    yield make
    for stop in stops:
        stop()


def expected_cache(src: KubernetesSource, api: FakeKubeAPI) -> dict:
    return {
        raw.ref.key: raw.body
        for kind, objs in api.objects.items()
        for obj in objs.values()
        for raw in [src._raw(kind, obj)]
    }


def cache(src: KubernetesSource) -> dict:
    return {o.ref.key: o.body for o in src.read()[0]}


def converged(src: KubernetesSource, api: FakeKubeAPI) -> bool:
    with api.cond:
        want = expected_cache(src, api)
    return cache(src) == want


def small_cluster(api: FakeKubeAPI, namespaces: int = 3, pods: int = 4) -> None:
    for n in range(namespaces):
        api.put(ns(f"ns{n}", team=f"t{n}"))
        for p in range(pods):
            api.put(pod(f"ns{n}/p{p}", f"10.1.{n}.{p + 1}", {"app": f"a{p % 2}"}))
    api.put(policy("ns0/deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))


# ---------------------------------------------------------------------- lists and watches


def test_initial_lists_paginate_and_watch_from_their_resource_version(api, make_source) -> None:
    small_cluster(api, namespaces=5, pods=5)  # 5 namespaces, 25 pods, 1 policy
    src = make_source(page_size=4)
    assert src.synced.wait(10)
    assert converged(src, api)

    pages = {k: [r.query for r in api.lists(k)] for k in ("Namespace", "Pod", "NetworkPolicy")}
    assert len(pages["Pod"]) == 7 and len(pages["Namespace"]) == 2 and len(pages["NetworkPolicy"]) == 1
    assert all(q["limit"] == "4" for qs in pages.values() for q in qs)
    assert "continue" not in pages["Pod"][0] and all("continue" in q for q in pages["Pod"][1:])

    expect(lambda: len(api.watches()) == WATCHES, what="one watch per kind")
    for w in api.watches():
        assert w.query["resourceVersion"] == str(api.rv)  # the list's resourceVersion
        assert w.query["allowWatchBookmarks"] == "true"
        assert int(w.query["timeoutSeconds"]) > 0
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api.requests)
    assert src.stats[("Pod", "list_pages")] == 7


def test_events_update_the_cache_and_call_back(api, make_source) -> None:
    small_cluster(api)
    calls: list[float] = []
    src = make_source(on_change=lambda: calls.append(time.monotonic()))
    assert src.synced.wait(10)
    expect(lambda: len(api.watches()) == WATCHES, what="watches")
    src.read_with_events()  # drain the initial list's changes
    before = len(calls)

    api.put(pod("ns1/new", "10.1.1.99", {"app": "fresh"}))  # ADDED
    api.put(pod("ns0/p0", "10.1.0.1", {"app": "relabelled"}))  # MODIFIED
    api.delete("Pod", "ns2", "p3")  # DELETED
    api.put(ns("ns1", team="other"))  # namespace label
    api.put(policy("ns1/allow", {"podSelector": {}, "ingress": [{}]}))
    api.delete("NetworkPolicy", "ns0", "deny")
    expect(lambda: converged(src, api), what="convergence")
    assert len(calls) - before == 6

    objects, _, events = src.read_with_events()
    kinds = sorted((e.ref.kind, e.type, e.ref.name) for e in events)
    assert kinds == sorted([("Pod", "ADDED", "new"), ("Pod", "MODIFIED", "p0"), ("Pod", "DELETED", "p3"),
                            ("Namespace", "MODIFIED", "ns1"), ("NetworkPolicy", "ADDED", "allow"),
                            ("NetworkPolicy", "DELETED", "deny")])
    assert next(e for e in events if e.ref.name == "new").new_ips == ("10.1.1.99",)
    assert next(e for e in events if e.ref.name == "p0").new_ips == ()  # same IP, new labels
    assert all(o.ref.source == "kubernetes" for o in objects)
    assert src.resource_version("Pod") == str(max(r for r, k, *_ in api.log if k == "Pod"))


def test_changes_the_semantics_ignore_do_not_wake_the_loop(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=1)
    calls: list[int] = []
    src = make_source(on_change=lambda: calls.append(1))
    assert src.synced.wait(10)
    expect(lambda: len(api.watches()) == WATCHES, what="watches")
    before = len(calls)
    heartbeat = pod("ns0/p0", "10.1.0.1", {"app": "a0"})
    heartbeat["metadata"]["annotations"] = {"touched": "now"}
    heartbeat["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    rv = api.put(heartbeat)
    expect(lambda: src.resource_version("Pod") == str(rv), what="event seen")
    assert len(calls) == before


def test_objects_are_trimmed(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=1)
    src = make_source()
    assert src.synced.wait(10)
    api.put(pod("ns0/late", "10.1.0.50"))  # via a watch event, not the list
    expect(lambda: converged(src, api), what="convergence")
    for o in src.read()[0]:
        meta = o.body["metadata"]
        assert set(meta) <= {"name", "namespace", "labels"}, meta
        assert "managedFields" not in meta and "annotations" not in meta
        if o.ref.kind == "Pod":
            assert set(o.body["status"]) <= {"phase", "podIP", "podIPs"}
            assert set(o.body["spec"]) == {"nodeName", "hostNetwork", "containers"}


def test_bookmark_advances_the_resource_version_and_the_resume_point(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=1)
    src = make_source()
    assert src.synced.wait(10)
    expect(lambda: len(api.watches()) == WATCHES, what="watches")
    rv = api.bookmark()
    expect(lambda: all(src.resource_version(k) == str(rv) for k in KINDS),
             what="bookmark rv")
    assert src.stats[("Pod", "bookmarks")] == 1
    lists = len(api.lists())
    api.cut_watches()  # reconnect: must resume from the bookmark, not relist
    expect(lambda: len(api.watches()) == 2 * WATCHES, what="reconnected watches")
    assert all(w.query["resourceVersion"] == str(rv) for w in api.watches()[WATCHES:])
    assert len(api.lists()) == lists


def test_410_gone_on_a_watch_relists_and_repairs_what_was_missed(api, make_source) -> None:
    small_cluster(api)
    src = make_source()
    assert src.synced.wait(10)
    expect(lambda: len(api.watches()) == WATCHES, what="watches")
    # History the watch never hears of, then the server compacts and expires the watch.
    api.delete("Pod", "ns1", "p1", silent=True)
    api.put(pod("ns1/p0", "10.1.1.1", {"app": "moved"}), silent=True)
    api.put(policy("ns2/quiet", {"podSelector": {}, "policyTypes": ["Egress"]}), silent=True)
    api.compact(gone=True)
    expect(lambda: converged(src, api), what="convergence after 410")
    assert src.stats[("Pod", "gone")] >= 1 and src.errors["watch_expired"] >= 3
    assert len(api.lists("Pod")) >= 2
    # The new watch resumes from the relist's resourceVersion, which is not compacted.
    expect(lambda: api.open_watches == WATCHES, what="watches after relist")
    api.put(pod("ns1/after", "10.1.1.77"))
    expect(lambda: converged(src, api), what="events after relist")


def test_watch_from_a_compacted_resource_version_relists(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=2)
    src = make_source()
    assert src.synced.wait(10)
    expect(lambda: len(api.watches()) == WATCHES, what="watches")
    api.delete("Pod", "ns0", "p1", silent=True)
    api.compact(gone=False)  # open watches go on; the next watch from an old rv gets 410
    api.cut_watches()
    expect(lambda: converged(src, api), what="convergence")
    assert src.stats[("Pod", "gone")] >= 1


def test_expired_continue_token_restarts_the_list(api, make_source) -> None:
    small_cluster(api, namespaces=2, pods=6)
    api.expire_continue = 1
    src = make_source(page_size=3)
    assert src.synced.wait(10)
    assert converged(src, api)
    assert sum(src.stats[(k, "list_restarts")] for k in KINDS) == 1
    assert src.errors["continue_expired"] == 1


def test_5xx_reconnects_with_jittered_exponential_backoff(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=1)
    api.fail(lambda r: r.kind == "Pod" and r.watch, times=5, status=500)
    api.fail(lambda r: r.kind == "Namespace" and not r.watch, times=2, status=503)
    src = make_source(backoff_base=0.1, backoff_cap=10.0)
    assert src.synced.wait(10)
    expect(lambda: len(api.watches("Pod")) == 6, what="sixth pod watch")
    times = [r.at for r in api.watches("Pod")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for i, gap in enumerate(gaps):
        # Equal jitter: each delay in [d/2, d], plus request time. Only the lower bound is
        # checked here (a loaded machine stretches gaps; the upper bound and the jitter are
        # test_backoff_is_exponential_with_jitter_and_capped's, with no clock involved).
        d = 0.1 * 2**i
        assert gap >= d / 2 - 0.01, (i, gaps)
    assert src.stats[("Pod", "errors")] == 5 and src.stats[("Namespace", "errors")] == 2
    assert src.errors["watch_http_5xx"] == 5 and src.errors["list_http_5xx"] == 2
    api.put(pod("ns0/after", "10.1.0.9"))
    expect(lambda: converged(src, api), what="events after 5xx")


def test_stream_cut_mid_event_resumes_without_loss_or_duplicates(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=2)
    src = make_source()
    assert src.synced.wait(10)
    expect(lambda: api.open_watches == WATCHES, what="watches")
    rv_before = src.resource_version("Pod")
    lists = len(api.lists())
    api.cut_watches()
    expect(lambda: len(api.watches("Pod")) == 2, what="pod watch reconnect")
    assert api.watches("Pod")[1].query["resourceVersion"] == rv_before
    expect(lambda: api.open_watches == WATCHES, what="watches back")
    # Events while the stream was cut, and after, both arrive once.
    for i in range(5):
        api.put(pod(f"ns0/burst{i}", f"10.1.0.{100 + i}"))
    api.cut_watches()
    api.put(ns("ns0", team="after-cut"))
    expect(lambda: converged(src, api), what="convergence after cuts")
    assert len(api.lists()) == lists  # a cut never costs a relist
    assert src.errors["watch_disconnected"] >= 2
    _, _, events = src.read_with_events()
    added = [e.ref.name for e in events if e.type == "ADDED"]
    assert sorted(added) == [f"burst{i}" for i in range(5)]


def test_slow_responses_and_a_dead_watch_connection(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=1)
    api.fail(lambda r: r.kind == "Pod" and not r.watch, times=1, status=0, delay=0.5)  # slow list
    api.hang_watches = 3  # the first watches never end and never speak
    t0 = time.monotonic()
    src = make_source(watch_timeout=1, read_slack=0.5)
    assert src.synced.wait(10)
    assert time.monotonic() - t0 >= 0.5
    # The client's read timeout (timeoutSeconds + slack) notices the dead connection.
    expect(lambda: len(api.watches("Pod")) >= 2, timeout=6, what="watch after read timeout")
    api.put(pod("ns0/after", "10.1.0.9"))
    expect(lambda: converged(src, api), what="convergence")


def test_periodic_relist_repairs_drift(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=2)
    src = make_source(resync=1.0)
    assert src.synced.wait(10)
    api.delete("Pod", "ns0", "p0", silent=True)  # a change no watch reports
    api.put(ns("ns0", team="drifted"), silent=True)
    expect(lambda: converged(src, api), timeout=5, what="resync")
    assert src.stats[("Pod", "resyncs")] >= 1


def test_node_pod_cidrs_gate_synced(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=1)
    api.put({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1"}, "spec": {}})
    src = make_source(node="n1", want_pod_cidrs=True)
    expect(lambda: all(e.is_set() for e in src.listed.values()), what="lists")
    time.sleep(0.2)
    assert not src.synced.is_set()  # no podCIDRs allocated yet
    api.put({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1"},
             "spec": {"podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24", "fd00:1::/64"]}})
    assert src.synced.wait(10)
    assert [str(c) for c in src.pod_cidrs] == ["10.1.0.0/24", "fd00:1::/64"]
    flag = make_source(watch=False, node="n1", want_pod_cidrs=True, pod_cidrs=["10.9.0.0/16"])
    assert [str(c) for c in flag.pod_cidrs] == ["10.9.0.0/16"]


def test_stop_ends_the_threads_promptly(api, make_source, tmp_path) -> None:
    small_cluster(api, namespaces=1, pods=1)
    src = KubernetesSource(kubeconfig=str(api.kubeconfig(tmp_path / "kc")), **FAST)
    stop = src.watch(lambda: None)
    assert src.synced.wait(10)
    expect(lambda: api.open_watches == WATCHES, what="watches")
    threads = list(src._threads)
    stop()  # joins each thread for up to 5 s: one still alive after it did not stop
    assert len(threads) == WATCHES and not any(t.is_alive() for t in threads)
    assert not src.watching


def test_kubeconfig_from_environment(api, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kc")))
    client = api_client()
    assert client.configuration.host == api.url
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    from agent.sources.kubernetes import SourceError

    with pytest.raises(SourceError):
        api_client()


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    lo = Backoff(1.0, 8.0, rng=lambda: 0.0)
    hi = Backoff(1.0, 8.0, rng=lambda: 1.0)
    assert [lo.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [hi.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    hi.reset()
    assert hi.next() == 1.0


# ---------------------------------------------------------------------- cluster-scoped kinds


CRDS = ("ClusterNetworkPolicy", "AdminNetworkPolicy", "BaselineAdminNetworkPolicy")


def cnp(name: str, priority: int = 10, tier: str = "Admin", action: str = "Deny") -> dict[str, Any]:
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": tier, "priority": priority, "subject": {"namespaces": {}},
                     "egress": [{"name": "r0", "action": action, "to": [{"networks": ["169.254.169.254/32"]}]}]}}


def anp(name: str, priority: int = 5) -> dict[str, Any]:
    return {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"priority": priority, "subject": {"namespaces": {}},
                     "ingress": [{"name": "r0", "action": "Pass", "from": [{"namespaces": {}}]}]}}


def banp() -> dict[str, Any]:
    return {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "BaselineAdminNetworkPolicy",
            "metadata": {"name": "default"},
            "spec": {"subject": {"namespaces": {}},
                     "ingress": [{"name": "r0", "action": "Deny", "from": [{"namespaces": {}}]}]}}


def node(name: str, ip: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "spec": {"podCIDRs": ["10.1.0.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                     {"type": "Hostname", "address": name}],
                       "images": [{"names": ["registry/pause:3.10"], "sizeBytes": 300000}]}}


def test_cluster_kinds_are_listed_watched_and_trimmed(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=1)
    for obj in (cnp("deny-metadata"), anp("legacy"), banp(), node("n1", "192.0.2.11", zone="a"),
                node("n2", "192.0.2.12", zone="b")):
        api.put(obj)
    calls: list[int] = []
    src = make_source(on_change=lambda: calls.append(1))
    assert src.synced.wait(10) and not src.unserved
    assert converged(src, api)
    expect(lambda: len(api.watches()) == WATCHES, what="watches")
    paths = {r.kind: r.path for r in api.watches()}
    assert paths["ClusterNetworkPolicy"] == "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"
    assert paths["BaselineAdminNetworkPolicy"].startswith("/apis/policy.networking.k8s.io/v1alpha1/")
    assert paths["Node"] == "/api/v1/nodes"
    for w in api.watches():
        assert w.query["resourceVersion"] == str(api.rv) and w.query["allowWatchBookmarks"] == "true"

    got = {o.ref.key: o for o in src.read()[0]}
    # Cluster-scoped: namespace "" (never "default"), whatever the object says.
    for key in [("ClusterNetworkPolicy", "", "deny-metadata"), ("AdminNetworkPolicy", "", "legacy"),
                ("BaselineAdminNetworkPolicy", "", "default"), ("Node", "", "n1"), ("Node", "", "n2")]:
        assert key in got, key
    policy_body = got[("ClusterNetworkPolicy", "", "deny-metadata")].body
    assert policy_body == {"kind": "ClusterNetworkPolicy", "apiVersion": "policy.networking.k8s.io/v1alpha2",
                           "metadata": {"name": "deny-metadata"}, "spec": cnp("deny-metadata")["spec"]}
    assert got[("AdminNetworkPolicy", "", "legacy")].body["apiVersion"] == "policy.networking.k8s.io/v1alpha1"
    node_body = got[("Node", "", "n1")].body
    assert node_body == {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1", "labels": {"zone": "a"}},
                         "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.11"},
                                                  {"type": "Hostname", "address": "n1"}]}}

    # Watch: add, modify and delete a CNP and a Node.
    src.read_with_events()
    before = len(calls)
    api.put(cnp("allow-dns", priority=20, action="Accept"))  # ADDED
    api.put(cnp("deny-metadata", priority=5))  # MODIFIED
    api.delete("BaselineAdminNetworkPolicy", "", "default")  # DELETED
    api.put(node("n3", "192.0.2.13"))  # ADDED
    api.put(node("n1", "192.0.2.21", zone="a"))  # MODIFIED: a new address
    api.delete("Node", "", "n2")  # DELETED
    expect(lambda: converged(src, api), what="convergence")
    assert len(calls) - before == 6
    _, _, events = src.read_with_events()
    assert sorted((e.ref.kind, e.type, e.ref.name) for e in events) == sorted([
        ("ClusterNetworkPolicy", "ADDED", "allow-dns"), ("ClusterNetworkPolicy", "MODIFIED", "deny-metadata"),
        ("BaselineAdminNetworkPolicy", "DELETED", "default"), ("Node", "ADDED", "n3"),
        ("Node", "MODIFIED", "n1"), ("Node", "DELETED", "n2")])
    assert all(e.ref.namespace == "" for e in events)

    # A node's heartbeat (conditions, images) changes nothing the semantics read: no wake-up.
    before = len(calls)
    beat = node("n3", "192.0.2.13")
    beat["status"]["conditions"] = [{"type": "Ready", "status": "True", "lastHeartbeatTime": "now"}]
    beat["status"]["images"] = []
    rv = api.put(beat)
    expect(lambda: src.resource_version("Node") == str(rv), what="heartbeat seen")
    assert len(calls) == before


def test_missing_crds_are_said_once_do_not_block_readiness_and_are_picked_up_later(
        api, make_source, caplog) -> None:
    small_cluster(api, namespaces=1, pods=1)
    api.missing.update(CRDS)  # a cluster without the network-policy-api CRDs
    caplog.set_level("INFO", logger="agent.sources.kubernetes")
    src = make_source(crd_retry=0.2)
    assert src.synced.wait(10)  # readiness never waits for a resource the cluster does not serve
    assert src.unserved == set(CRDS)
    expect(lambda: len(api.lists("ClusterNetworkPolicy")) >= 4, what="slow retries of the list")
    assert not any(w.kind in CRDS for w in api.watches())  # nothing to watch
    assert src.errors["crd_missing"] == 3  # once per kind, however often it is asked again
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "not served" in r.getMessage()]
    assert sorted(r.getMessage().split()[0] for r in warnings) == sorted(CRDS)
    assert all("none are enforced" in r.getMessage() for r in warnings)

    # The CRD is installed and a policy created: picked up by the next retry, then watched.
    api.install_crd("ClusterNetworkPolicy")
    api.put(cnp("deny-metadata"))
    expect(lambda: ("ClusterNetworkPolicy", "", "deny-metadata") in cache(src), what="CNP after install")
    assert src.unserved == {"AdminNetworkPolicy", "BaselineAdminNetworkPolicy"}
    expect(lambda: any(w.kind == "ClusterNetworkPolicy" for w in api.watches()), what="CNP watch")
    api.put(cnp("allow-dns", priority=20, action="Accept"))
    expect(lambda: converged(src, api), what="CNP watch events")
    assert src.errors["crd_missing"] == 3


def test_a_crd_deleted_while_watched_empties_its_kind_and_is_said_once(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=1)
    api.put(cnp("deny-metadata"))
    api.put(cnp("allow-dns", priority=20, action="Accept"))
    calls: list[int] = []
    src = make_source(on_change=lambda: calls.append(1), crd_retry=0.2)
    assert src.synced.wait(10)
    expect(lambda: api.open_watches == WATCHES, what="watches")
    src.read_with_events()
    api.uninstall_crd("ClusterNetworkPolicy")  # its objects are deleted, then the resource is gone
    expect(lambda: "ClusterNetworkPolicy" in src.unserved, what="not served")
    assert not any(k[0] == "ClusterNetworkPolicy" for k in cache(src))
    assert src.errors["crd_missing"] == 1
    _, _, events = src.read_with_events()
    assert sorted((e.type, e.ref.name) for e in events if e.ref.kind == "ClusterNetworkPolicy") == [
        ("DELETED", "allow-dns"), ("DELETED", "deny-metadata")]
    expect(lambda: len(api.lists("ClusterNetworkPolicy")) >= 4, what="retries")
    assert src.errors["crd_missing"] == 1
    assert converged(src, api)


def test_one_shot_sync_with_missing_crds_lists_what_is_served(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=2)
    api.put(node("n1", "192.0.2.11"))
    api.missing.update({"AdminNetworkPolicy", "BaselineAdminNetworkPolicy"})
    api.put(cnp("deny-metadata"))
    src = make_source(watch=False)
    src.sync(timeout=10)
    assert src.synced.is_set() and src.unserved == {"AdminNetworkPolicy", "BaselineAdminNetworkPolicy"}
    assert converged(src, api)
    assert not api.watches()


def test_410_and_bookmarks_repair_cluster_kinds(api, make_source) -> None:
    small_cluster(api, namespaces=1, pods=1)
    api.put(cnp("deny-metadata"))
    api.put(node("n1", "192.0.2.11"))
    src = make_source()
    assert src.synced.wait(10)
    expect(lambda: api.open_watches == WATCHES, what="watches")
    rv = api.bookmark()
    expect(lambda: src.resource_version("ClusterNetworkPolicy") == str(rv)
           and src.resource_version("Node") == str(rv), what="bookmarks")
    # History no watch hears of, then the server compacts and expires every watch.
    api.delete("ClusterNetworkPolicy", "", "deny-metadata", silent=True)
    api.put(cnp("allow-dns", priority=20, action="Accept"), silent=True)
    api.put(node("n1", "192.0.2.99"), silent=True)
    api.compact(gone=True)
    expect(lambda: converged(src, api), what="convergence after 410")
    assert src.stats[("ClusterNetworkPolicy", "gone")] >= 1 and src.stats[("Node", "gone")] >= 1


def test_manifest_directory_reads_cluster_kinds(tmp_path) -> None:
    from agent.sources.files import DirectorySource
    from tests.kit.builders import dump_manifests

    ns_cnp = cnp("deny-metadata")
    ns_cnp["metadata"]["namespace"] = "shop"  # meaningless on a cluster-scoped kind: ignored
    (tmp_path / "cluster.yaml").write_text(dump_manifests([
        ns_cnp, anp("legacy"), banp(),
        {"apiVersion": "v1", "kind": "NodeList", "items": [node("n1", "192.0.2.11")]},
    ]))
    objects, problems = DirectorySource(tmp_path, settle=0).read()
    assert not problems
    assert sorted(o.ref.key for o in objects) == [
        ("AdminNetworkPolicy", "", "legacy"), ("BaselineAdminNetworkPolicy", "", "default"),
        ("ClusterNetworkPolicy", "", "deny-metadata"), ("Node", "", "n1")]


def test_cluster_policies_over_the_watch_decide_as_from_the_directory(api, make_source, tmp_path) -> None:
    """A CNP and a Node peer arriving over the watch: the same verdicts as the manifest
    directory; the CRD going away takes its policies with it."""
    from agent.query import explain

    base = [ns("a", team="red"), ns("b", team="blue"), pod("a/web", "10.0.0.1", {"app": "web"}),
            pod("b/cli", "10.0.1.1", {"app": "cli"}), node("n1", "192.0.2.11", role="infra")]
    deny = cnp("red-closed")
    deny["spec"] = {"tier": "Admin", "priority": 10, "subject": {"namespaces": {"matchLabels": {"team": "red"}}},
                    "ingress": [{"name": "from-blue", "action": "Deny",
                                 "from": [{"namespaces": {"matchLabels": {"team": "blue"}}}]}],
                    "egress": [{"name": "no-infra-nodes", "action": "Deny", "to": [{"nodes": {
                        "matchLabels": {"role": "infra"}}}]}]}
    api.set_state(base)
    src = make_source()
    pipe = KubernetesPipeline(None, source=src)
    assert src.synced.wait(10)
    assert matrix(pipe.snapshot(), "80", "TCP", None)["b/cli"]["a/web"] == "allow"

    api.put(deny)
    expect(lambda: converged(src, api), what="CNP over the watch")
    snap = pipe.snapshot()
    assert not snap.problems
    directory = DirectoryPipeline(write_dir(tmp_path / "dir", [*base, deny]), None).snapshot()
    got = matrix(snap, "80", "TCP", None)
    assert got == matrix(directory, "80", "TCP", None)
    assert got["b/cli"]["a/web"] == "deny" and got["a/web"]["b/cli"] == "allow"
    to_node = explain(snap, "a/web", "192.0.2.11", "TCP", "22").flow
    assert to_node.verdict.value == "drop" and "red-closed" in str(to_node.egress.rule.origin)

    api.uninstall_crd("ClusterNetworkPolicy")
    expect(lambda: "ClusterNetworkPolicy" in src.unserved, what="CRD gone")
    assert matrix(pipe.snapshot(), "80", "TCP", None)["b/cli"]["a/web"] == "allow"
    assert pipe.errors["crd_missing"] == 1  # stockade_source_errors_total{cause="crd_missing"}


def test_the_source_asks_for_nothing_the_cluster_role_does_not_grant(api, make_source) -> None:
    rbac = Path(__file__).resolve().parents[2] / "deploy" / "base" / "rbac.yaml"
    [role] = [d for d in yaml.safe_load_all(rbac.read_text()) if d["kind"] == "ClusterRole"]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    small_cluster(api, namespaces=1, pods=1)
    api.put({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1"}, "spec": {"podCIDRs": ["10.1.0.0/24"]}})
    api.put(cnp("deny-metadata"))
    src = make_source(node="n1", want_pod_cidrs=True)
    assert src.synced.wait(10)
    expect(lambda: len(api.watches()) == WATCHES, what="watches")
    assert set(RESOURCES) == set(KINDS)  # the source lists and watches every kind the semantics read
    asked = {(*r.resource, r.verb) for r in api.requests}
    assert asked <= granted, asked - granted
    assert {("policy.networking.k8s.io", "clusternetworkpolicies", "watch"), ("", "nodes", "get"),
            ("", "nodes", "watch")} <= asked


# ---------------------------------------------------------------------- pipeline and daemon


def test_pipeline_never_hands_out_a_partial_view(api, make_source) -> None:
    small_cluster(api)
    api.fail(lambda r: r.kind == "NetworkPolicy", times=1000, status=503)
    src = make_source()
    pipe = KubernetesPipeline(None, source=src, sync_wait=0.3)
    expect(lambda: src.listed["Pod"].is_set() and src.listed["Namespace"].is_set(), what="lists")
    assert not pipe.ready.is_set()
    with pytest.raises(SourceNotSynced) as exc:
        pipe.snapshot()
    assert isinstance(exc.value, PipelineError) and exc.value.transient  # the daemon keeps the kernel as it is
    assert "NetworkPolicys" in str(exc.value)
    api.faults.clear()
    assert src.synced.wait(10)
    snap = pipe.snapshot()
    assert len(snap.inventory.endpoints) == 12 and len(snap.inventory.policies) == 1


def test_one_shot_pipeline_lists_without_watching(api, tmp_path) -> None:
    small_cluster(api)
    pipe = KubernetesPipeline(None, kubeconfig=str(api.kubeconfig(tmp_path / "kc")), **FAST)
    snap = pipe.snapshot()
    assert len(snap.inventory.endpoints) == 12 and not snap.problems
    assert not api.watches()
    assert snap.program.source == "kubernetes"


def test_daemon_readiness_and_event_to_program_latency(api, make_source) -> None:
    from prometheus_client import CollectorRegistry

    from agent.daemon import Daemon

    small_cluster(api, namespaces=3, pods=10)
    api.fail(lambda r: r.kind == "NetworkPolicy" and not r.watch, times=3, status=500, delay=0.2)
    src = KubernetesSource(kubeconfig=None, client=make_source(watch=False).client, node="n1", **FAST)
    pipe = KubernetesPipeline("n1", source=src, sync_wait=0.2)
    dp = RecordingDataplane()
    registry = CollectorRegistry()
    daemon = Daemon(pipe, dp, debounce=0.01, resync=30, registry=registry)
    latency = daemon.event_latency
    import threading

    t = threading.Thread(target=daemon.run, daemon=True)
    t.start()
    try:
        assert daemon.ready.wait(10)
        # Ready implies every list was in: the first program already has the policy.
        assert daemon.is_ready() and src.synced.is_set() and dp.programs
        assert registry.get_sample_value("stockade_source_errors_total", {"cause": "list_http_5xx"}) == 3
        first = dp.programs[0]
        assert any(ep.ingress.isolated for ep in first.endpoints.values())
        for i in range(20):
            n = len(dp.programs)
            api.put(pod(f"ns1/w{i}", f"10.1.1.{100 + i}", {"app": "a0"}))
            expect(lambda n=n: len(dp.programs) > n, what="sync")
            expect(lambda i=i: f"ns1/w{i}" in dp.programs[-1].endpoints, what="pod in program")
        samples = [dt for kind, _, dt in latency.samples if kind == "PodIP"]
        assert len(samples) == 20
        median = statistics.median(samples)
        print(f"\nevent->program (recording dataplane, debounce 10ms): median {median * 1000:.1f} ms, "
              f"max {max(samples) * 1000:.1f} ms over {len(samples)} pod IPs")
        assert median < 1.0
        assert registry.get_sample_value("stockade_pod_ip_to_kernel_seconds_count") == 20
    finally:
        daemon.stop()
        t.join(5)


# ---------------------------------------------------------------------- same answers as the directory

CASES = load_cases()


def test_watch_protocol_gives_the_directory_sources_verdicts(api, make_source, tmp_path) -> None:
    """Every upstream case step arrives as watch events; matrix == directory == upstream."""
    src = make_source(page_size=5)
    pipe = KubernetesPipeline(None, source=src)
    assert src.synced.wait(10)
    steps = 0
    for case in CASES:
        for i, step in enumerate(case["steps"]):
            objects = step_objects(step)
            api.set_state(objects)
            expect(lambda: converged(src, api), what=f"{case['name']} step {i}")
            snap = pipe.snapshot()
            assert not snap.problems
            directory = DirectoryPipeline(write_dir(tmp_path / "dir", objects), None).snapshot()
            for probe in step["probes"]:
                port, proto = str(probe["port"]), probe["protocol"]
                got = matrix(snap, port, proto, None)
                assert got == matrix(directory, port, proto, None), (case["name"], i, probe)
                want = expected_grid(probe["expect"], pod_keys(objects))
                assert off_diagonal(got) == off_diagonal(want), (case["name"], i, probe)
            steps += 1
    assert steps >= 48
    # Deleting a namespace (and its pods, as the API server's GC would) over the watch.
    for key in [k for k in api.objects["Pod"] if k[0] == "z"]:
        api.delete("Pod", *key)
    api.delete("Namespace", "", "z")
    expect(lambda: converged(src, api), what="namespace deletion")
    snap = pipe.snapshot()
    assert not any(k.startswith("z/") for k in snap.inventory.endpoints) and "z" not in snap.inventory.namespaces


def test_read_changes_hands_over_what_changed(api, make_source) -> None:
    """read_changes: every object by key, only the keys that changed since the last call, and
    unchanged objects as the same objects (also across a relist), so admission costs what
    changed."""
    small_cluster(api)
    src = make_source()
    assert src.synced.wait(10)
    expect(lambda: len(api.watches()) == WATCHES, what="watches")
    first, changed, _ = src.read_changes()
    assert changed is None  # the first call: everything is new
    assert {k: o.body for k, o in first.items()} == cache(src)
    api.put(pod("ns0/p0", "10.1.0.1", {"app": "relabelled"}))
    api.delete("Pod", "ns2", "p3")
    api.put(pod("ns1/new", "10.1.1.99", {"app": "fresh"}))
    expect(lambda: converged(src, api), what="convergence")
    objects, changed, events = src.read_changes()
    assert changed == {("Pod", "ns0", "p0"), ("Pod", "ns2", "p3"), ("Pod", "ns1", "new")}
    assert len(events) == 3
    assert {k: o.body for k, o in objects.items()} == cache(src)
    assert all(objects[k] is o for k, o in first.items() if k not in changed)
    src._list("Pod")  # a relist with nothing new: no change, the same objects
    again, changed, _ = src.read_changes()
    assert changed == set()
    assert all(again[k] is o for k, o in objects.items())
