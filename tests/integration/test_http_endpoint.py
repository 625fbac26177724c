"""The agent's HTTP endpoint cannot be stalled, cannot hold up enforcement, refuses bad
requests with a short 4xx, and serves /drops to loopback clients only by default.

Clients are real sockets opened inside the lab's namespaces (setns moves only the
calling thread); the agent is the real CLI in the node namespace.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent import cli
from agent.endpoint import MAX_PER_PEER, ListenAddress
from tests.kit import GATEWAY4, Lab, until
from tests.kit.enforcement import ALLOW_A_TO_B, DENY_B, B, build, cluster, write
from tests.kit.netns import inside

PORT = 9754
LOCAL = f"127.0.0.1:{PORT}"


def connect(ns: str, host: str = "127.0.0.1", port: int = PORT, timeout: float = 10.0) -> socket.socket:
    with inside(ns):
        return socket.create_connection((host, port), timeout=timeout)


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def request(ns: str, raw: bytes, host: str = "127.0.0.1", timeout: float = 10.0) -> tuple[int, bytes]:
    """Send `raw`, read the answer to the end (the agent closes after one request)."""
    with connect(ns, host, timeout=timeout) as s:
        s.sendall(raw)
        data = read_all(s)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2]


def get(ns: str, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    return request(ns, f"GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n".encode(), host)


def answer(ns: str, path: str) -> tuple[int, bytes]:
    """get(), or (0, b"") while nothing listens."""
    try:
        return get(ns, path)
    except OSError:
        return 0, b""


def metric(lab: Lab, name: str) -> float:
    _, body = get(lab.node, "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def start_agent(lab: Lab, tmp_path: Path, *extra: str, dataplane: str = "nftables",
                address: str = LOCAL, wait: bool = True) -> subprocess.Popen:
    src = tmp_path / "src"
    if not src.exists():
        write(src, cluster())
    agent = lab.spawn_agent("run", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                            "--state-dir", str(tmp_path / "state"), "--metrics-address", address, *extra)
    if wait:
        assert until(lambda: lab.http_get(f"http://{LOCAL}/readyz")[0] == 200, 60), lab.agent_output(agent)
    return agent


class Slowloris(threading.Thread):
    """Sends a request head one byte a second and never finishes it; notes whether the
    agent answered or closed the connection."""

    def __init__(self, ns: str) -> None:
        super().__init__(daemon=True)
        self.sock = connect(ns, timeout=1.0)
        self.sock.sendall(b"GET /healthz HTTP/1.0\r\nX-Slow: ")
        self.answer: bytes | None = None

    def run(self) -> None:
        with self.sock:
            for _ in range(60):
                try:
                    self.sock.send(b"a")
                    self.answer = self.sock.recv(4096)  # waits one second for an answer
                    return
                except TimeoutError:
                    continue
                except OSError:  # reset: cut as well
                    self.answer = b""
                    return


def test_idle_and_slow_clients_do_not_stall_healthz(lab: Lab, tmp_path: Path) -> None:
    agent = start_agent(lab, tmp_path)
    idle = connect(lab.node)  # connected, sends nothing
    slow = Slowloris(lab.node)
    slow.start()
    # The old single-threaded server answered nothing while `idle` was open.
    assert get(lab.node, "/healthz") == (200, b"ok\n")
    assert get(lab.node, "/readyz") == (200, b"ok\n")
    # Both are cut: answered 408 and closed, not kept forever.
    with idle:
        idle.settimeout(60)
        assert read_all(idle).startswith(b"HTTP/1.0 408")
    slow.join(90)
    assert slow.answer is not None, "the slow client was never cut"
    assert slow.answer == b"" or slow.answer.startswith(b"HTTP/1.0 408")
    assert metric(lab, 'stockade_http_requests_rejected_total{reason="timeout"}') >= 2
    assert agent.poll() is None and "Traceback" not in lab.agent_output(agent)


def test_one_peer_cannot_take_every_connection(lab: Lab, tmp_path: Path) -> None:
    lab.add_pod("app/a", ["10.20.0.1"])
    lab.add_pod("app/b", ["10.20.0.2"])
    start_agent(lab, tmp_path, address=f"0.0.0.0:{PORT}")
    a = lab.pods["app/a"].netns
    held = [connect(a, GATEWAY4) for _ in range(MAX_PER_PEER + 4)]
    try:
        # Each connection beyond the peer's share is closed at once, not queued.
        assert until(lambda: metric(lab, 'stockade_http_requests_rejected_total{reason="busy"}') >= 4, 20)
        # Another pod and the node itself still get answers.
        assert get(lab.pods["app/b"].netns, "/healthz", GATEWAY4) == (200, b"ok\n")
        assert get(lab.node, "/healthz") == (200, b"ok\n")
    finally:
        for s in held:
            s.close()


def test_bad_requests_get_a_short_4xx(lab: Lab, tmp_path: Path) -> None:
    agent = start_agent(lab, tmp_path)
    node = lab.node
    for since in ("abc", "-1", "1e3", "9" * 40):
        status, body = get(node, f"/drops?since={since}")
        assert (status, body) == (400, b"since must be a non-negative integer\n"), since
    assert get(node, "/drops?since=0")[0] == 200
    assert request(node, b"GET /" + b"a" * 10_000 + b" HTTP/1.0\r\n\r\n")[0] == 414
    assert request(node, b"GET /healthz HTTP/1.0\r\n" + b"X-Big: " + b"b" * 30_000 + b"\r\n\r\n")[0] == 431
    assert request(node, b"POST /healthz HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")[0] == 405
    assert request(node, b"GET /healthz HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")[0] == 413
    assert request(node, b"GET /healthz HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")[0] == 413
    assert request(node, b"NOT HTTP AT ALL\r\n\r\n")[0] == 400
    assert get(node, "/nowhere")[0] == 404
    assert get(node, "/healthz") == (200, b"ok\n")
    assert metric(lab, 'stockade_http_requests_rejected_total{reason="bad_request"}') >= 5
    assert agent.poll() is None and "Traceback" not in lab.agent_output(agent)


def test_drops_answer_loopback_clients_only_by_default(lab: Lab, tmp_path: Path) -> None:
    lab.add_pod("app/a", ["10.20.0.1"])
    agent = start_agent(lab, tmp_path, address=f"0.0.0.0:{PORT}")
    pod = lab.pods["app/a"].netns
    # A pod reaches the node's address: metrics and probes yes, flows and pod names no.
    assert get(pod, "/drops", GATEWAY4)[0] == 403
    assert get(pod, "/metrics", GATEWAY4)[0] == 200
    # On the node, the client reaches it through loopback (also when told the wildcard).
    for address in (LOCAL, f"0.0.0.0:{PORT}"):
        assert lab.stockade("drops", "--agent", address, "--output", "json").returncode == 0
    refused = lab.stockade("drops", "--agent", f"{GATEWAY4}:{PORT}", check=False)
    assert refused.returncode != 0 and "403" in refused.stderr and "--drops-public" in refused.stderr

    agent.terminate()
    agent.wait(timeout=10)
    start_agent(lab, tmp_path, "--drops-public", address=f"0.0.0.0:{PORT}")
    assert get(pod, "/drops", GATEWAY4) == (200, b"[]")


def hold_port(lab: Lab, address: str = LOCAL) -> subprocess.Popen:
    """Another process listening on `address` in the node namespace, until killed."""
    host, port = address.rsplit(":", 1)
    code = ("import socket, sys\n"
            f"s = socket.create_server(({host!r}, {port}))\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen(["ip", "netns", "exec", lab.node, sys.executable, "-c", code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_enforcement_starts_while_the_port_is_taken(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    write(tmp_path / "src", [*cluster(a={"app": "a", "role": "client"}), DENY_B, ALLOW_A_TO_B])
    holder = hold_port(lab)
    assert lab.reachable("app/c", B, 80)  # nothing enforced yet
    agent = start_agent(lab, tmp_path, dataplane=dataplane, wait=False)
    assert until(lambda: not lab.reachable("app/c", B, 80, timeout=0.5), 90), lab.agent_output(agent)
    assert lab.reachable("app/a", B, 80)
    assert agent.poll() is None
    assert f"cannot listen on {LOCAL}" in lab.agent_output(agent)

    holder.kill()
    holder.wait(timeout=10)
    assert until(lambda: answer(lab.node, "/readyz") == (200, b"ok\n"), 40), lab.agent_output(agent)
    assert metric(lab, "stockade_http_bind_failures_total") >= 1
    assert "listening on" in lab.agent_output(agent)


@pytest.mark.parametrize("text", ["9754", ":9754", "0.0.0.0", "localhost:9754", "::1:9754", "[::1]",
                                  "[127.0.0.1]:9754", "::1", "1.2.3.4:0", "1.2.3.4:70000", "1.2.3.4:-1"])
def test_metrics_address_must_be_ip_and_port(text: str, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STOCKADE_METRICS_ADDRESS", raising=False)
    for command, flag in (("run", "--metrics-address"), ("drops", "--agent")):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, flag, text])
        assert exc.value.code == 2
        assert f"argument {flag}: expected HOST:PORT" in capsys.readouterr().err
    # The same from the environment, named as such.
    monkeypatch.setenv("STOCKADE_METRICS_ADDRESS", text)
    with pytest.raises(SystemExit) as exc:
        cli.main(["run"])
    assert exc.value.code == 2
    assert "$STOCKADE_METRICS_ADDRESS" in capsys.readouterr().err


def test_metrics_address_forms() -> None:
    assert ListenAddress.parse("0.0.0.0:9754") == ListenAddress("0.0.0.0", 9754)
    assert ListenAddress.parse("[::1]:9754") == ListenAddress("::1", 9754)
    assert str(ListenAddress.parse("[::]:1")) == "[::]:1"
    assert ListenAddress.parse("[::]:1").client() == ListenAddress("::1", 1)
    assert ListenAddress.parse("0.0.0.0:1").client() == ListenAddress("127.0.0.1", 1)


def test_bare_port_is_a_cli_error_naming_the_flag() -> None:
    """The whole program, as an operator runs it: exit 2 before touching anything."""
    res = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--metrics-address", "9754"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 2
    assert "argument --metrics-address: expected HOST:PORT" in res.stderr and "'9754'" in res.stderr
