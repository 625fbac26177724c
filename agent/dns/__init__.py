"""DNS egress (ClusterNetworkPolicy `domainNames`): learning which addresses each pod was
answered for the names its rules allow (learn.py, pure), holding answers on their way to the
pod until the agent has learned from them (hold.py with bpf/dnshold.c), and the glue that
makes `stockade run --dns-egress` (egress.py; off by default, experimental)."""
