"""The systemd unit (and its eBPF drop-in) pass `systemd-analyze verify`, `systemd-analyze
security` rates them at most 2.5, and they grant each dataplane only what it needs.

systemd is not PID 1 here: both commands run offline on a copy whose ExecStart points at
this checkout. tests/integration/test_confined_agent.py runs the agent under the
confinement these files describe.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.dns import hold
from tests.kit import sandbox

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "stockade.service"
DROPIN = ROOT / "systemd" / "stockade.service.d" / "ebpf.conf"
DNS_DROPIN = ROOT / "systemd" / "stockade.service.d" / "dns-egress.conf"
MAX_EXPOSURE = 2.5


def _analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd)")
    return analyze


def _install(tmp: Path, dataplane: str, unit_text: str | None = None) -> Path:
    """The unit (and for eBPF its drop-in, where systemd looks for it) in `tmp`."""
    stockade = Path(sys.executable).with_name("stockade")
    unit = unit_text if unit_text is not None else UNIT.read_text()
    assert "ExecStart=/usr/local/bin/stockade run --source netbird" in unit
    target = tmp / "stockade.service"
    target.write_text(unit.replace("/usr/local/bin/stockade", str(stockade)))
    if dataplane == "ebpf":
        (tmp / "stockade.service.d").mkdir()
        shutil.copy(DROPIN, tmp / "stockade.service.d" / "ebpf.conf")
    return target


def _security(target: Path) -> tuple[subprocess.CompletedProcess, float]:
    # --threshold is in tenths: exit status non-zero above it.
    res = subprocess.run([_analyze(), "security", "--offline=true", f"--threshold={round(MAX_EXPOSURE * 10)}",
                          "--no-pager", str(target)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for stockade\.service: (\d+\.\d)", res.stdout)
    assert m, res.stdout + res.stderr
    return res, float(m.group(1))


@pytest.mark.parametrize("dataplane", ["nftables", "ebpf"])
def test_unit_verifies(tmp_path: Path, dataplane: str) -> None:
    target = _install(tmp_path, dataplane)
    res = subprocess.run([_analyze(), "verify", str(target)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    unit = UNIT.read_text()
    for directive in ("Type=notify", "EnvironmentFile=/etc/stockade/stockade.env", "Restart=on-failure",
                      "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                      "SystemCallArchitectures=native", "RestrictAddressFamilies=", "SystemCallFilter=@system-service"):
        assert directive in unit


@pytest.mark.parametrize("dataplane", ["nftables", "ebpf"])
def test_exposure_is_at_most_2_5(tmp_path: Path, dataplane: str) -> None:
    res, score = _security(_install(tmp_path, dataplane))
    assert res.returncode == 0 and score <= MAX_EXPOSURE, res.stdout
    if dataplane == "ebpf":  # the drop-in was read: its capabilities are rated
        assert re.search(r"✗ CapabilityBoundingSet=~CAP_BPF", res.stdout), res.stdout


def test_the_rating_fails_a_unit_without_the_hardening(tmp_path: Path) -> None:
    """Guard against a check that passes anything: without its system-call filter and
    the kernel protections the unit is rated above the limit."""
    weak = "\n".join(line for line in UNIT.read_text().splitlines()
                     if not line.startswith(("SystemCallFilter=", "Protect", "Private", "MemoryDeny")))
    res, score = _security(_install(tmp_path, "nftables", weak))
    assert score > MAX_EXPOSURE and res.returncode != 0, res.stdout


def test_each_dataplane_gets_only_what_it_needs() -> None:
    nft = sandbox.confinement(UNIT)
    assert nft.caps == ("net_admin",)  # nfnetlink (nftables, conntrack, NFLOG) and rtnetlink
    assert nft.nnp and nft.mdwe and nft.errno is None
    assert nft.families == ("AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX")
    assert not {"bpf", "perf_event_open", "setuid", "mount", "init_module", "setrlimit", "ptrace"} & set(nft.syscalls)
    ebpf = sandbox.confinement(UNIT, DROPIN)
    assert ebpf.caps == ("bpf", "net_admin", "perfmon")
    assert set(ebpf.syscalls) - set(nft.syscalls) == {"bpf"}
    dropin = sandbox.unit_settings(DROPIN)
    assert dropin["ReadWritePaths"] == ["/sys/fs/bpf"] and dropin["ProtectKernelModules"] == ["no"]
    assert dropin["Environment"] == ["STOCKADE_DATAPLANE=ebpf"]
    assert "ReadWritePaths=/sys/fs/bpf" not in UNIT.read_text()
    # The environment file is read after Environment= and would override the drop-in's dataplane.
    env = (ROOT / "systemd" / "stockade.env").read_text()
    assert not re.search(r"^\s*STOCKADE_DATAPLANE=", env, re.M)


@pytest.mark.parametrize("dataplane", ["nftables", "ebpf"])
def test_dns_egress_dropin_verifies_and_is_rated_at_most_2_5(tmp_path: Path, dataplane: str) -> None:
    target = _install(tmp_path, dataplane)
    (tmp_path / "stockade.service.d").mkdir(exist_ok=True)
    shutil.copy(DNS_DROPIN, tmp_path / "stockade.service.d" / "dns-egress.conf")
    res = subprocess.run([_analyze(), "verify", str(target)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res, score = _security(target)
    assert res.returncode == 0 and score <= MAX_EXPOSURE, res.stdout
    assert re.search(r"✗ RestrictAddressFamilies=~AF_PACKET", res.stdout), res.stdout  # the drop-in was read


@pytest.mark.parametrize("files", [[UNIT], [UNIT, DROPIN]], ids=["nftables", "ebpf"])
def test_dns_egress_dropin_adds_exactly_what_the_hold_needs(files: list[Path]) -> None:
    """What agent/dns/hold.py says the hold needs, read from the code, is what the drop-in
    adds to either dataplane's confinement (the CAP_NET_ADMIN it also needs is the unit's)."""
    base, dns = sandbox.confinement(*files), sandbox.confinement(*files, DNS_DROPIN)
    need = {c.removeprefix("CAP_").lower() for c in hold.CAPABILITIES}
    assert set(dns.caps) == set(base.caps) | need and "net_admin" in base.caps
    assert set(dns.families or ()) == set(base.families or ()) | set(hold.ADDRESS_FAMILIES)
    assert set(dns.syscalls or ()) - set(base.syscalls or ()) == set(hold.SYSCALLS) - set(base.syscalls or ())
    assert set(hold.SYSCALLS) <= set(dns.syscalls or ())
    settings = sandbox.unit_settings(DNS_DROPIN)
    assert settings["BindPaths"] == list(hold.DEVICES)
    assert settings["DeviceAllow"] == [f"{d} rw" for d in hold.DEVICES]
    assert settings["Environment"] == ["STOCKADE_ARGS=--dns-egress"]
    assert not dns.protect_modules  # bcc's kernel headers
