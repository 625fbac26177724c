"""Run a command under the confinement a systemd unit gives it, without systemd as PID 1.

systemd is not PID 1 on the test machine, so stockade.service cannot be started. What
its settings do to the process itself is reproduced here from the unit's own text:

- CapabilityBoundingSet=/AmbientCapabilities=, NoNewPrivileges=: `setpriv` (util-linux);
  as root, the permitted and effective sets after exec are the bounding set.
- SystemCallFilter= (with the groups systemd itself expands: `systemd-analyze
  syscall-filter`), SystemCallErrorNumber=, SystemCallArchitectures=native,
  RestrictAddressFamilies= and MemoryDenyWriteExecute=: seccomp filters built with
  libseccomp (Debian python3-seccomp) following systemd's semantics: an allow-list
  (always with @default), `~` lines remove from it, later plain lines add back; a
  denied call kills the process unless an errno is set; socket() of another family fails
  with EAFNOSUPPORT; mmap W+X, mprotect/pkey_mprotect +X and shmat SHM_EXEC fail with
  EPERM.

Not reproduced (they need systemd's mount namespace): ProtectSystem=, Private*=,
Protect{Home,Proc,Kernel*,ControlGroups}=, ProcSubset=, ReadWritePaths=, UMask=.

`python -m tests.lab.sandbox CONFINEMENT_JSON -- CMD...` installs the filters and execs
CMD; `command()` builds the full command line, `spawn_agent()` runs the agent with it.
"""

from __future__ import annotations

import errno
import functools
import json
import mmap
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.lab import Lab

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "stockade.service"
EBPF_DROPIN = ROOT / "systemd" / "stockade.service.d" / "ebpf.conf"
AF_MAX = 46  # linux/socket.h (6.x); families at or above it are refused too
SHM_EXEC = 0o100000


@dataclass(frozen=True)
class Confinement:
    caps: tuple[str, ...]  # lower-case names without CAP_, as setpriv wants them
    syscalls: tuple[str, ...]  # allowed system calls (groups expanded)
    errno: int | None  # SystemCallErrorNumber=; None: a denied call kills the process
    families: tuple[str, ...] | None  # RestrictAddressFamilies= allow-list (AF_* names)
    mdwe: bool  # MemoryDenyWriteExecute=
    nnp: bool  # NoNewPrivileges=


def unit_settings(*files: Path) -> dict[str, list[str]]:
    """[Service] assignments of a unit and its drop-ins, in order (continuations joined)."""
    out: dict[str, list[str]] = {}
    for path in files:
        section = ""
        text = re.sub(r"\\\n", " ", path.read_text())
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]" and "=" in line:
                key, value = line.split("=", 1)
                out.setdefault(key.strip(), []).append(value.strip())
    return out


@functools.cache
def syscall_groups() -> dict[str, tuple[str, ...]]:
    """systemd's own syscall groups (@name -> members, which may be groups)."""
    text = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True,
                          check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.startswith("    ") and not line.strip().startswith("#"):
            current.append(line.strip())
        elif not line.strip():
            current = None
    return {k: tuple(v) for k, v in groups.items()}


def expand(names: Iterable[str]) -> set[str]:
    groups = syscall_groups()
    out: set[str] = set()
    for name in names:
        if name.startswith("@"):
            out |= expand(groups[name])
        else:
            out.add(name)
    return out


def _bool(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("yes", "true", "1", "on")


def confinement(*files: Path) -> Confinement:
    s = unit_settings(*files)
    allowed: set[str] | None = None
    for value in s.get("SystemCallFilter", []):
        if not value:
            allowed = None
            continue
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split())
        if allowed is None:
            if deny:
                raise ValueError("deny-list SystemCallFilter= is not reproduced; the unit uses an allow-list")
            allowed = expand(["@default"]) | names  # systemd adds @default to allow-lists
        elif deny:
            allowed -= names
        else:
            allowed |= names
    if allowed is None:
        raise ValueError(f"{files[0]}: no SystemCallFilter=")
    if s.get("SystemCallArchitectures", [""])[-1] != "native":
        raise ValueError(f"{files[0]}: SystemCallArchitectures= is not native")
    caps: set[str] = set()
    for value in s.get("CapabilityBoundingSet", []):
        caps = set() if not value else caps | {c.removeprefix("CAP_").lower() for c in value.split()}
    ambient: set[str] = set()
    for value in s.get("AmbientCapabilities", []):
        ambient = set() if not value else ambient | {c.removeprefix("CAP_").lower() for c in value.split()}
    if ambient - caps:
        raise ValueError(f"ambient capabilities outside the bounding set: {sorted(ambient - caps)}")
    err = s.get("SystemCallErrorNumber", [""])[-1]
    families: set[str] | None = None
    for value in s.get("RestrictAddressFamilies", []):
        families = None if not value else (families or set()) | set(value.split())
    return Confinement(
        caps=tuple(sorted(caps)), syscalls=tuple(sorted(allowed)),
        errno=getattr(errno, err) if err else None,
        families=tuple(sorted(families)) if families is not None else None,
        mdwe=_bool(s.get("MemoryDenyWriteExecute")), nnp=_bool(s.get("NoNewPrivileges")),
    )


@functools.cache
def available_caps() -> frozenset[str]:
    """Capabilities this process may pass on (its bounding set), by setpriv's names, which
    it lists in capability-number order."""
    names = subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True, check=True).stdout.split()
    status = Path("/proc/self/status").read_text()
    mask = int(re.search(r"^CapBnd:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    return frozenset(n for i, n in enumerate(names) if mask >> i & 1)


def command(conf: Confinement, argv: Sequence[str]) -> list[str]:
    """setpriv + this module + argv. Capabilities the test machine itself lacks cannot be
    granted: they are left out (the caller checks `available_caps()`)."""
    caps = ",".join(["-all", *(f"+{c}" for c in conf.caps if c in available_caps())])
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", f"--ambient-caps={caps}",
            *(["--no-new-privs"] if conf.nnp else []),
            sys.executable, "-m", "tests.lab.sandbox", json.dumps(asdict(conf)), "--", *argv]


def spawn_agent(lab: Lab, conf: Confinement, *args: str) -> subprocess.Popen:
    """Lab.spawn_agent, confined: `stockade <args>` in the node namespace, output to a file."""
    fd, name = tempfile.mkstemp(prefix=f"{lab.prefix}-agent-", suffix=".log")
    try:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.node, *command(conf, [sys.executable, "-m", "agent.cli", *args])],
            cwd=ROOT, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(fd)
    lab.procs.append(proc)
    lab.logs[proc.pid] = Path(name)
    return proc


def _install(conf: Confinement) -> None:
    import seccomp

    # Argument filters first (default allow): the allow-list, loaded last, has no
    # seccomp()/prctl() of its own to spare. The kernel applies the strictest verdict.
    args = seccomp.SyscallFilter(seccomp.ALLOW)
    if conf.families is not None:
        allowed = {getattr(socket, f) for f in conf.families}
        refuse = seccomp.ERRNO(errno.EAFNOSUPPORT)
        for fam in range(AF_MAX):
            if fam not in allowed:
                args.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.EQ, fam))
        args.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.GE, AF_MAX))
    if conf.mdwe:
        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        args.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
        for call in ("mprotect", "pkey_mprotect"):
            args.add_rule(seccomp.ERRNO(errno.EPERM), call,
                          seccomp.Arg(2, seccomp.MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
        args.add_rule(seccomp.ERRNO(errno.EPERM), "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
    args.load()

    deny = seccomp.KILL_PROCESS if conf.errno is None else seccomp.ERRNO(conf.errno)
    calls = seccomp.SyscallFilter(deny)  # native architecture only: other ABIs get KILL
    for name in conf.syscalls:
        try:
            calls.add_rule(seccomp.ALLOW, name)
        except (ValueError, RuntimeError):  # unknown on this architecture: systemd skips it too
            continue
    calls.load()


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m tests.lab.sandbox CONFINEMENT_JSON -- CMD...")
    raw = json.loads(argv[0])
    conf = Confinement(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    _install(conf)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
