"""The reliability soak: a small cluster in the lab, the agent run and restarted, and the
scenarios that check the kernel against the simulator; run briefly by
tests/integration/test_reliability.py and at length by `python -m bench.reliability`."""
