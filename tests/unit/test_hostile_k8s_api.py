"""Hostile objects over the Kubernetes API source: the same fail-closed reading, the same
problems (object and field path) as the manifest directory. No kernel: the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.pipeline import DirectoryPipeline, KubernetesPipeline
from agent.query import matrix
from agent.sources.kubernetes import KubernetesSource
from tests.kit import until
from tests.kit.builders import ns, pod, policy
from tests.kit.cases import write_dir
from tests.kit.kubeapi import FakeKubeAPI

pytest.importorskip("kubernetes")


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[FakeKubeAPI, KubernetesSource]]:
    api = FakeKubeAPI().start()
    src = KubernetesSource(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")), backoff_base=0.05,
                           backoff_cap=0.4, connect_timeout=2.0, read_slack=2.0)
    stop = src.watch(lambda: None)
    try:
        yield api, src
    finally:
        stop()
        api.close()


def hostile() -> list[dict[str, Any]]:
    prod = ns("prod", env="prod")
    prod["metadata"]["labels"]["tier"] = 1
    return [
        ns("app"), prod,
        pod("app/a", "10.1.0.1", {"app": "a"}), pod("app/b", "10.1.0.2", {"app": "b"}),
        pod("app/c", "10.1.0.3", {"app": "c"}), pod("prod/p", "10.1.1.1", {"app": "p"}),
        pod("app/d", "10.1.0.4", {"app": "d", "version": 2}),  # type: ignore[dict-item]
        policy("app/b-in", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.1.0.0/33"}}]},
            {"from": [{"ipBlock": {"cidr": "010.001.000.003/32"}}]}]}),
        policy("app/not-prod", {"podSelector": {"matchLabels": {"app": "c"}}, "ingress": [
            {"from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "env", "operator": "NotIn", "values": ["prod"]}]}}]}]}),
        policy("prod/zero", {"podSelector": {"matchLabels": 0}, "ingress": [{}]}),
    ]


def test_api_source_reads_hostile_objects_like_the_directory(source, tmp_path: Path) -> None:
    api, src = source
    objects = hostile()
    api.set_state(objects)
    pipe = KubernetesPipeline(None, source=src)
    until(lambda: len(src.read()[0]) >= len(objects), 30, 0.05)
    snap = pipe.snapshot()
    directory = DirectoryPipeline(write_dir(tmp_path / "dir", objects), None).snapshot()
    problems = sorted((p.ref.kind, p.ref.namespace, p.ref.name, p.field) for p in snap.problems)
    assert problems == sorted((p.ref.kind, p.ref.namespace, p.ref.name, p.field) for p in directory.problems)
    assert problems == [
        ("Namespace", "", "prod", "metadata.labels[tier]"),
        ("NetworkPolicy", "app", "b-in", "spec.ingress[0].from[0].ipBlock.cidr"),
        ("NetworkPolicy", "prod", "zero", "spec.podSelector.matchLabels"),
        ("Pod", "app", "d", "metadata.labels[version]"),
    ]
    got = matrix(snap, "80", "TCP", None)
    assert got == matrix(directory, "80", "TCP", None)
    assert {s for s in got if s != "app/b" and got[s]["app/b"] == "allow"} == {"app/c"}  # 010.001.000.003 = c
    assert {s for s in got if s != "app/c" and got[s]["app/c"] == "allow"} == {"app/a", "app/b"}  # d, p: no
    assert {s for s in got if s != "app/d" and got[s]["app/d"] == "allow"} == set()  # d: still isolated
    assert {s for s in got if s != "prod/p" and got[s]["prod/p"] == "allow"} == set()
