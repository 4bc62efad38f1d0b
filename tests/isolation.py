"""Keep a test session out of the user's own Prism: private Ray temp dirs, free ports, and cleanup by process id.

A user may be running `make serve` (a local Ray instance serving port 8000) or a `ray start` cluster while
`make test` runs. Every pytest process therefore gets its own RAY_TMPDIR: its Ray sessions, sockets and address
file live there, so `ray.init(address="local")` never meets theirs, and whatever a crashed test leaves behind is
found by that path alone and stopped by pid — never a forced stop of every Ray process on the machine, which would
take the user's Ray down too.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path


def free_port(preferred: int | None = None) -> int:
    """`preferred` when nothing listens on it (stable ports make logs readable), else one the kernel picks."""
    if preferred is not None and not port_in_use(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, read from /proc."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """Every process below `pid` (children, their children, ...)."""
    tree = _children() if tree is None else tree
    out, todo = [], list(tree.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += tree.get(p, [])
    return out


def pids_using(path: str) -> list[int]:
    """Processes whose command line names `path` (Ray's raylet, GCS, monitors: --session-dir, --log_dir), and every
    process below them (the workers, whose titles are rewritten to ray::...)."""
    tree, found = _children(), []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if path.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    found = [p for p in found if p != os.getpid()]
    return sorted({p for root in found for p in (root, *descendants(root, tree))})


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
