"""DNS egress (ClusterNetworkPolicy `domainNames`): learning which addresses each pod was
answered for the names its rules allow (learn.py, pure), and holding answers on their way
to the pod until the agent has seen them (hold.py with bpf/dnshold.c; a spike, not wired
into the daemon)."""
