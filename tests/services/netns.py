"""Machines that share nothing but a network, on one Linux box: one network namespace per host.

    with HostNetwork.create(["svc", "w1", "w2"]) as net:
        net["svc"].run(["hostname"])                 # "svc", in its own namespaces
        proc = subprocess.Popen(net["w1"].command(["obdconv", "worker"]))
        net["w2"].run(["redis-cli", "-h", net["svc"].address, "ping"])

The test process itself never opens a socket to these addresses: its own (root) namespace has the
machine's real default route, so 198.18.x would leave the machine from there. Everything that talks
to a host runs as a process ON a host (`command`, `run`).

Topology (all made here, all removed by `destroy`, also after a failure; a leftover from a killed
run is removed by the next `create`): a namespace `<prefix>-<pid>-sw` holding a bridge, and per host a
namespace `<prefix>-<pid>-<host>` with a veth pair whose other end is a port of that bridge. Addresses
ONLY from the benchmarking range 198.18.0.0/15 (RFC 2544), one /24 on the bridge; no default
route, no address on the bridge, nothing connected to the root namespace. Loopback is left DOWN
unless asked for: "localhost" on such a host reaches nothing, not even the host itself (nor does
its own address), so a URL naming it fails at once.

Each host also has its own mount and UTS namespaces, held by a small `init` process (`sleep`):
private tmpfs on /tmp, /var/tmp and /var/lib/obdconv (spool, scratch, temp files), its own
hostname, and /work bind-mounted read-only. Commands run inside with `nsenter` into those
namespaces, so every command of a host sees the same private files, and no other host sees them.
Killing a host (`kill`) ends every process in its network namespace, init included; its tmpfs
goes with the last process holding its mount namespace, as a machine's disk goes with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "198.18.0"  # .0/24 of 198.18.0.0/15, the only addresses these hosts get
PREFIX = "obdmh"
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/var/lib/obdconv")
READ_ONLY_DIRS = ("/work",)


class NetnsError(RuntimeError):
    pass


def netns_available() -> str:
    """"" when this process can make network namespaces, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    for tool in ("ip", "unshare", "nsenter"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            return f"{tool} not installed"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _netns_pids(netns: str) -> list[int]:
    out = _ip("netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split()]


def _kill_netns(netns: str) -> None:
    """SIGKILL every process in `netns` until none is left."""
    for _ in range(50):
        pids = _netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise NetnsError(f"processes in {netns} survive SIGKILL: {_netns_pids(netns)}")


def remove_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces `<prefix>...` whose creating process is gone (a killed earlier run)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(prefix + "-"):
            continue
        owner = name[len(prefix) + 1:].split("-", 1)[0]
        if owner.isdigit() and Path(f"/proc/{owner}").exists() and int(owner) != os.getpid():
            continue  # another live run's
        _kill_netns(name)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    return removed


@dataclass
class Host:
    """One machine: its network namespace, address, and the init process holding its private
    mount and UTS namespaces."""

    name: str
    netns: str
    address: str
    init: subprocess.Popen[bytes] | None = None

    # -- lifetime --------------------------------------------------------------------------------

    def boot(self) -> Host:
        """Start (or, after `kill`, restart with empty disks) the host's init."""
        script = ["set -e"]
        for path in PRIVATE_DIRS:
            script.append(f"mkdir -p {path} && mount -t tmpfs -o mode=1777,size=4g obdmh-{self.name} {path}")
        for path in READ_ONLY_DIRS:
            if Path(path).is_dir():
                script.append(f"mount --bind {path} {path} && mount -o remount,bind,ro {path}")
        # Commands entering the host start in init's working directory (`nsenter --wd`): its own /tmp.
        # (`--wd=/tmp` would resolve /tmp BEFORE entering, i.e. the machine's shared /tmp.)
        script += [f"hostname {self.name}", "cd /tmp", "echo ready", "exec sleep infinity"]
        self.init = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", "\n".join(script)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd="/")
        assert self.init.stdout is not None
        line = self.init.stdout.readline()
        if line.strip() != b"ready":
            err = self.init.stderr.read().decode(errors="replace") if self.init.stderr else ""
            raise NetnsError(f"host {self.name} did not boot: {line!r} {err}")
        return self

    def kill(self) -> None:
        """Power off: every process of this host dies at once (SIGKILL); its disks go with it."""
        _kill_netns(self.netns)
        if self.init is not None:
            self.init.wait(10)
            self.init = None

    # -- running things on it ----------------------------------------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv that runs `argv` on this host (its network, files and hostname)."""
        if self.init is None or self.init.poll() is not None:
            raise NetnsError(f"host {self.name} is not running")
        return ["nsenter", "-t", str(self.init.pid), "--mount", "--uts", "--net", "--wd", "--", *argv]

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 120,
            env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(self.command(argv), input=input, capture_output=True, timeout=timeout,
                                env={**os.environ, **(env or {})})
        if check and result.returncode != 0:
            raise NetnsError(f"on {self.name}: {' '.join(argv)} exited {result.returncode}: "
                             f"{result.stderr.decode(errors='replace')[-2000:]}")
        return result

    def write_file(self, path: str, data: bytes) -> None:
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path], input=data)

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).returncode == 0

    # -- faults ----------------------------------------------------------------------------------

    def link(self, up: bool) -> None:
        """Plug in / pull out the host's network cable (its veth end)."""
        _ip("-n", self.netns, "link", "set", "eth0", "up" if up else "down")


@dataclass
class HostNetwork:
    prefix: str
    hosts: dict[str, Host] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @classmethod
    def create(cls, names: Sequence[str], prefix: str = PREFIX, loopback: Sequence[str] = ()) -> HostNetwork:
        """Hosts `names`; those in `loopback` get their loopback interface up (a host talking to
        its own address goes through it: a server host that checks on itself needs it)."""
        remove_leftovers(prefix)
        net = cls(f"{prefix}-{os.getpid()}")
        try:
            net._build(names, loopback)
        except BaseException:
            net.destroy()
            raise
        return net

    def _build(self, names: Sequence[str], loopback: Sequence[str]) -> None:
        switch = f"{self.prefix}-sw"
        _ip("netns", "add", switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, name in enumerate(names, start=1):
            netns = f"{self.prefix}-{name}"
            _ip("netns", "add", netns)
            _ip("-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", switch)
            _ip("-n", switch, "link", "set", f"p{i}", "master", "br0", "up")
            address = f"{SUBNET}.{i}"
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            if name in loopback:
                _ip("-n", netns, "link", "set", "lo", "up")
            self.hosts[name] = Host(name, netns, address).boot()

    def routes(self, name: str) -> str:
        return _ip("-n", self.hosts[name].netns, "route", "show", "table", "all").stdout

    def addresses(self, name: str) -> str:
        return _ip("-n", self.hosts[name].netns, "-o", "addr", "show").stdout

    def destroy(self) -> None:
        errors = []
        for host in self.hosts.values():
            try:
                host.kill()
            except Exception as e:  # keep removing the rest
                errors.append(f"{host.name}: {e}")
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(self.prefix + "-"):
                _kill_netns(name)
                _ip("netns", "del", name, check=False)
        self.hosts.clear()
        if errors:
            raise NetnsError("; ".join(errors))

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
