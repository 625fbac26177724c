"""Manifests that attack the directory source: a YAML alias bomb and a self-referencing alias."""

from __future__ import annotations

import yaml

from tests.kit.builders import policy

DENY = yaml.safe_dump(policy("a/default-deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))

# "Billion laughs": 9 levels of 9 aliases, about 600 bytes, 9**9 strings once expanded.
BOMB = "\n".join(
    ["apiVersion: networking.k8s.io/v1", "kind: NetworkPolicy",
     "metadata: {name: default-deny, namespace: a}", "spec: {podSelector: {}, policyTypes: [Ingress]}",
     'x0: &x0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"x{i}: &x{i} [" + ",".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 9)]
    + ["bomb: [" + ",".join(["*x8"] * 9) + "]", ""]
)

SELF_ALIAS = DENY + "loop: &me [*me]\n"
