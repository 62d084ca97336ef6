"""Hosts on one machine for tests of what crosses a network: Linux network namespaces on a bridge.

    with hosts(2) as net:            # namespaces "<prefix>0", "<prefix>1": 10.R.0.2, 10.R.0.3
        net.popen(0, ["ray", "start", ...], ...)   # a process on host 0, in its own session
        net.run(1, ["ip", "addr"])

Each host is a network namespace with its own loopback and an ``eth0`` (one end of a veth pair whose
other end is on a bridge in the root namespace); the bridge carries 10.R.0.1/24 so the test process
can reach the hosts too. Only the network is separate: the hosts share this machine's files (and its
``/etc/hosts``, where this machine's name may resolve to 127.0.0.1, as on many bare-metal hosts).
Names carry this process's id and a count of the hosts made in it (a second ``hosts()`` in the same
pytest process must not meet the first's veth, which outlives ``ip netns del`` while a socket in the
namespace is still closing); a name already taken, by a leftover of an earlier run, is skipped. On
exit the TCP sockets in each namespace are destroyed (``ss -K``) before it is deleted. Needs root and
iproute2's ``ip``; :func:`unavailable` says why a test must skip. Processes started with
:meth:`Hosts.popen` are stopped by their process group id on exit, then the namespaces and the
bridge are deleted, whatever happened in between.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` (Debian's iproute2)"
    return None


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")


@dataclass
class Hosts:
    names: list[str]  # the namespaces, one per host
    addresses: list[str]  # each host's eth0 address
    bridge: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def command(self, host: int, argv: list[str]) -> list[str]:
        """``argv`` run on ``host`` (``ip netns exec`` execs it: the pid is the program's own)."""
        return ["ip", "netns", "exec", self.names[host], *argv]

    def run(self, host: int, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), check=False, **kwargs)

    def popen(self, host: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """A long-running process on ``host``, in its own session (stopped by its group on exit)."""
        proc = subprocess.Popen(self.command(host, argv), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """Kill ``proc``'s whole process group (one this helper started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


_made = itertools.count()  # hosts() calls in this process: each gets new names and a new subnet


def _taken(link: str) -> bool:
    return subprocess.run(["ip", "link", "show", link], capture_output=True, check=False).returncode == 0


def _new_tag() -> tuple[str, int]:
    """A name tag and a subnet no link on this machine uses yet (interface names: 15 bytes at most)."""
    pid = os.getpid() % 100000
    for _ in range(100):
        n = next(_made)
        tag = f"{pid}x{n % 100}"
        if not _taken(f"aigcbr{tag}") and not _taken(f"aigcv{tag}h0"):
            return tag, 10 + (pid + 37 * n) % 240  # 10.<subnet>.0.0/24
    raise RuntimeError("no free name for a test bridge: remove the leftover aigc* links (ip link)")


@contextlib.contextmanager
def hosts(count: int) -> Iterator[Hosts]:
    """``count`` namespaces on one new bridge; everything removed on exit."""
    tag, subnet = _new_tag()
    bridge = f"aigcbr{tag}"
    net = Hosts(
        names=[f"aigc{tag}h{i}" for i in range(count)],
        addresses=[f"10.{subnet}.0.{i + 2}" for i in range(count)],
        bridge=bridge,
    )
    made: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"10.{subnet}.0.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, (name, addr) in enumerate(zip(net.names, net.addresses, strict=True)):
            _ip("netns", "add", name)
            made.append(name)
            veth = f"aigcv{tag}h{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield net
    finally:
        for proc in net.procs:
            net.stop(proc)
        for name in made:  # deleting a namespace deletes its end of the veth, and so the pair
            # A socket still closing (TIME_WAIT, FIN_WAIT) keeps the namespace, and with it the veth,
            # alive after `ip netns del`; destroy them first (ss -K needs CONFIG_INET_DIAG_DESTROY:
            # where it is missing the names are simply not reused).
            subprocess.run(
                ["ip", "netns", "exec", name, "ss", "-K", "-t", "-a"],
                capture_output=True,
                timeout=30,
                check=False,
            )
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", name)
        with contextlib.suppress(RuntimeError):
            _ip("link", "del", bridge)
