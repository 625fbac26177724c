"""Run a command under the confinement a systemd unit gives it, without systemd as PID 1.

systemd is not PID 1 on the test machine, so stockade.service cannot be started. What
its settings do to the process itself is reproduced here from the unit's own text:

- CapabilityBoundingSet=/AmbientCapabilities=, NoNewPrivileges=: `setpriv` (util-linux);
  as root, the permitted and effective sets after exec are the bounding set.
- SystemCallFilter= (with the groups systemd itself expands: `systemd-analyze
  syscall-filter`), SystemCallErrorNumber=, SystemCallArchitectures=native,
  RestrictAddressFamilies=, RestrictNamespaces=yes, LockPersonality= and
  MemoryDenyWriteExecute=: seccomp filters built with libseccomp (Debian python3-seccomp)
  following systemd's semantics: an allow-list (always with @default), `~` lines remove
  from it, later plain lines add back; a denied call kills the process unless an errno is
  set; socket() of another family fails with EAFNOSUPPORT; setns(), unshare() and clone()
  of namespaces fail with EPERM and clone3() with ENOSYS (glibc falls back to clone());
  personality() other than PER_LINUX fails with EPERM; mmap W+X, mprotect/pkey_mprotect +X and shmat
  SHM_EXEC fail with EPERM.
- In a mount namespace of its own: ProtectSystem=strict (every mount read-only but /proc,
  /sys, /dev and the writable paths), ReadWritePaths=/StateDirectory= (mapped to the
  test's own paths), PrivateTmp= (stood in for by a writable /tmp: the test's files live
  there), ProtectKernelTunables= (/sys and /proc/sys read-only, /proc/kallsyms and
  /proc/kcore inaccessible), ProtectKernelModules= (/usr/lib/modules inaccessible),
  ProtectHome= and ProtectProc= (a procfs with hidepid=).

Not reproduced: PrivateDevices=, PrivateMounts=, ProcSubset=, RemoveIPC=, UMask=,
LimitMEMLOCK=.

`command()` builds the command line: `unshare --mount` runs this module's `mounts` step as
root, which execs `setpriv`, which execs its `seccomp` step, which execs the command; the
pid stays the same throughout. `spawn_agent()` runs the agent with it.
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.kit import Lab

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "stockade.service"
EBPF_DROPIN = ROOT / "systemd" / "stockade.service.d" / "ebpf.conf"
AF_MAX = 46  # linux/socket.h (6.x); families at or above it are refused too
SHM_EXEC = 0o100000
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME (linux/sched.h)
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)


@dataclass(frozen=True)
class Confinement:
    caps: tuple[str, ...]  # lower-case names without CAP_, as setpriv wants them
    syscalls: tuple[str, ...] | None  # allowed system calls (groups expanded); None: no allow-list
    errno: int | None  # SystemCallErrorNumber=; None: a denied call kills the process
    families: tuple[str, ...] | None  # RestrictAddressFamilies= allow-list (AF_* names)
    mdwe: bool  # MemoryDenyWriteExecute=
    nnp: bool  # NoNewPrivileges=
    namespaces: bool  # RestrictNamespaces=yes
    personality: bool  # LockPersonality=
    protect_system: str  # ProtectSystem=: "strict" or "no" (others are not reproduced)
    private_tmp: bool
    protect_home: bool
    protect_tunables: bool  # ProtectKernelTunables=
    protect_modules: bool  # ProtectKernelModules=
    protect_proc: str  # ProtectProc=: "default", "invisible", "noaccess" or "ptraceable"
    writable: tuple[str, ...]  # ReadWritePaths= and /var/lib/<StateDirectory=>


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
    protect_system = s.get("ProtectSystem", ["no"])[-1]
    if protect_system not in ("strict", "no"):
        raise ValueError(f"ProtectSystem={protect_system} is not reproduced")
    namespaces = s.get("RestrictNamespaces", ["no"])[-1]
    if namespaces not in ("yes", "no"):
        raise ValueError(f"RestrictNamespaces={namespaces} is not reproduced (only yes/no)")
    writable = [p.lstrip("-") for v in s.get("ReadWritePaths", []) for p in v.split()]
    writable += [f"/var/lib/{d}" for v in s.get("StateDirectory", []) for d in v.split()]
    return Confinement(
        caps=tuple(sorted(caps)), syscalls=tuple(sorted(allowed)),
        errno=getattr(errno, err) if err else None,
        families=tuple(sorted(families)) if families is not None else None,
        mdwe=_bool(s.get("MemoryDenyWriteExecute")), nnp=_bool(s.get("NoNewPrivileges")),
        namespaces=namespaces == "yes", personality=_bool(s.get("LockPersonality")),
        protect_system=protect_system, private_tmp=_bool(s.get("PrivateTmp")),
        protect_home=_bool(s.get("ProtectHome")), protect_tunables=_bool(s.get("ProtectKernelTunables")),
        protect_modules=_bool(s.get("ProtectKernelModules")),
        protect_proc=s.get("ProtectProc", ["default"])[-1], writable=tuple(dict.fromkeys(writable)),
    )


@functools.cache
def available_caps() -> frozenset[str]:
    """Capabilities this process may pass on (its bounding set), by setpriv's names, which
    it lists in capability-number order."""
    names = subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True, check=True).stdout.split()
    status = Path("/proc/self/status").read_text()
    mask = int(re.search(r"^CapBnd:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    return frozenset(n for i, n in enumerate(names) if mask >> i & 1)


def cap_mask(caps: Iterable[str]) -> int:
    """The capability bit mask of /proc/PID/status for `caps` (those this machine has)."""
    names = subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True, check=True).stdout.split()
    return sum(1 << names.index(c) for c in caps if c in available_caps())


def from_container(container: dict[str, Any]) -> Confinement:
    """What a Kubernetes container spec grants, as far as it can be reproduced here: its
    capabilities (as root, the container's sets are the added ones), no_new_privs
    (allowPrivilegeEscalation: false) and readOnlyRootFilesystem (everything read-only
    but its writable volumes and the API file systems). Not its seccomp profile:
    RuntimeDefault is the container runtime's own, which is not on this machine."""
    sc = container["securityContext"]
    caps = sc["capabilities"]
    assert caps.get("drop") == ["ALL"], "only drop: [ALL] plus additions is reproduced"
    writable = tuple(m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly"))
    return Confinement(
        caps=tuple(sorted(c.lower() for c in caps.get("add", []))), syscalls=None, errno=None, families=None,
        mdwe=False, nnp=sc.get("allowPrivilegeEscalation") is False, namespaces=False, personality=False,
        protect_system="strict" if sc.get("readOnlyRootFilesystem") else "no", private_tmp=False,
        protect_home=False, protect_tunables=False, protect_modules=False, protect_proc="default",
        writable=writable,
    )


def command(conf: Confinement, argv: Sequence[str], paths: Mapping[str, str] | None = None) -> list[str]:
    """The full command line. `paths` maps the unit's writable paths to the test's (e.g.
    /var/lib/stockade to the test's --state-dir); unmapped ones stay writable if they exist.
    Capabilities the test machine itself lacks cannot be granted: they are left out (the
    caller checks `available_caps()`)."""
    caps = ",".join(["-all", *(f"+{c}" for c in conf.caps if c in available_caps())])
    spec = json.dumps(asdict(conf))
    return ["unshare", "--mount", "--propagation", "private", "--",
            sys.executable, "-m", "tests.kit.sandbox", "mounts", spec, json.dumps(paths or {}), "--",
            "setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", f"--ambient-caps={caps}",
            *(["--no-new-privs"] if conf.nnp else []),
            sys.executable, "-m", "tests.kit.sandbox", "seccomp", spec, "--", *argv]


def spawn_agent(lab: Lab, conf: Confinement, *args: str, paths: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Lab.spawn_agent, confined: `stockade <args>` in the node namespace, output to a file."""
    return lab.spawn_in_node(command(conf, [sys.executable, "-m", "agent.cli", *args], paths))


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
    if conf.namespaces:
        args.add_rule(seccomp.ERRNO(errno.EPERM), "setns")
        for flag in NAMESPACE_FLAGS:
            args.add_rule(seccomp.ERRNO(errno.EPERM), "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
            args.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        args.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # flags out of seccomp's reach
    if conf.personality:  # anything but the current personality (PER_LINUX), as systemd does
        args.add_rule(seccomp.ERRNO(errno.EPERM), "personality", seccomp.Arg(0, seccomp.NE, 0))
    args.load()

    if conf.syscalls is None:
        return
    deny = seccomp.KILL_PROCESS if conf.errno is None else seccomp.ERRNO(conf.errno)
    calls = seccomp.SyscallFilter(deny)  # native architecture only: other ABIs get KILL
    for name in conf.syscalls:
        try:
            calls.add_rule(seccomp.ALLOW, name)
        except (ValueError, RuntimeError):  # unknown on this architecture: systemd skips it too
            continue
    calls.load()


def _mount(*args: str, gone_ok: str | None = None) -> None:
    """mount(8); with `gone_ok`, a failure because that mount point vanished meanwhile (the
    host is busy: other tests' namespaces and bpffs come and go) is not an error."""
    res = subprocess.run(["mount", *args], capture_output=True, text=True)
    if res.returncode != 0 and not (gone_ok and (not os.path.exists(gone_ok) or gone_ok not in _mountpoints())):
        raise SystemExit(f"sandbox: mount {' '.join(args)}: {res.stderr.strip()}")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _mountpoints() -> list[str]:
    """Mount points of this namespace, parents first (mountinfo escapes blanks as octal)."""
    points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
              for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return list(dict.fromkeys(points))


def _mounts(conf: Confinement, paths: Mapping[str, str]) -> None:
    """The file-system part, as root in a fresh mount namespace (`unshare --mount`)."""
    # Inaccessible as systemd makes paths: a mode-000 file or directory mounted over them
    # (no capability the command keeps overrides file modes). Made first, while /tmp is
    # writable; the mounts keep them after they are unlinked at the end.
    fd, empty_file = tempfile.mkstemp(prefix="stockade-sandbox-")
    os.close(fd)
    empty_dir = tempfile.mkdtemp(prefix="stockade-sandbox-")
    try:
        os.chmod(empty_file, 0)
        os.chmod(empty_dir, 0)
        _confine_files(conf, paths, empty_file, empty_dir)
    finally:
        os.unlink(empty_file)
        os.rmdir(empty_dir)


def _confine_files(conf: Confinement, paths: Mapping[str, str], empty_file: str, empty_dir: str) -> None:
    if conf.protect_proc != "default":
        _mount("-t", "proc", "-o", f"hidepid={conf.protect_proc}", "proc", "/proc")
    writable = []
    for unit_path in conf.writable:
        path = paths.get(unit_path, unit_path)
        if unit_path in paths:
            os.makedirs(path, exist_ok=True)  # as StateDirectory= would
        if os.path.isdir(path):
            writable.append(os.path.realpath(path))
    if conf.private_tmp:
        writable.append("/tmp")
    for path in writable:  # a mount of their own, left writable below
        _mount("--bind", path, path)
    api = ("/proc", "/sys", "/dev")
    for point in _mountpoints():
        if any(_under(point, w) for w in writable) or not os.path.exists(point):
            continue  # (a mount whose directory is gone: lazily unmounted elsewhere)
        if (conf.protect_system == "strict" and not any(_under(point, a) for a in api)) or \
                (conf.protect_tunables and _under(point, "/sys")):
            _mount("-o", "remount,bind,ro", point, gone_ok=point)
    hidden = []
    if conf.protect_tunables:
        for path in ("/proc/sys", "/proc/sysrq-trigger"):
            if not os.path.exists(path):
                continue  # (no CONFIG_MAGIC_SYSRQ)
            _mount("--bind", path, path)
            _mount("-o", "remount,bind,ro", path)
        hidden += ["/proc/kallsyms", "/proc/kcore"]
    if conf.protect_modules:
        hidden += ["/usr/lib/modules", "/lib/modules"]
    if conf.protect_home:
        hidden += ["/home", "/root", "/run/user"]
    for path in dict.fromkeys(os.path.realpath(p) for p in hidden):
        if os.path.exists(path):
            _mount("--bind", empty_dir if os.path.isdir(path) else empty_file, path)


def _confinement(text: str) -> Confinement:
    raw = json.loads(text)
    return Confinement(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def run_cli(lab: Lab, conf: Confinement, *args: str, check: bool = True,
            paths: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Lab.stockade, confined: the CLI once, in the node namespace."""
    from tests.kit import sh

    return sh(*command(conf, [sys.executable, "-m", "agent.cli", *args], paths), check=check, ns=lab.node, cwd=ROOT)


def main(argv: list[str]) -> None:
    if len(argv) >= 4 and argv[0] == "mounts" and argv[3] == "--":
        _mounts(_confinement(argv[1]), json.loads(argv[2]))
        os.execvp(argv[4], argv[4:])
    if len(argv) >= 3 and argv[0] == "seccomp" and argv[2] == "--":
        _install(_confinement(argv[1]))
        os.execvp(argv[3], argv[3:])
    raise SystemExit("usage: python -m tests.kit.sandbox mounts CONFINEMENT PATHS -- CMD... | "
                     "seccomp CONFINEMENT -- CMD...")


if __name__ == "__main__":
    main(sys.argv[1:])
