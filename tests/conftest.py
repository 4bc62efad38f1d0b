"""Marks tests by folder (unit / integration / e2e / cluster), keeps Ray on loopback, and keeps every test session's
Ray apart from a user's own (tests/isolation.py)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.isolation import kill_pids, pids_using

# Before anything imports ray: keep a single-node cluster on 127.0.0.1 (MACHINE-NOTES.md) and quiet.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A private Ray temp dir per pytest process (short: Ray's socket paths must stay under 108 bytes), and no
# RAY_ADDRESS: the tests start their own Ray and never attach to a cluster the user started.
RAY_TMPDIR = tempfile.mkdtemp(prefix="prt-", dir="/tmp")
os.environ["RAY_TMPDIR"] = RAY_TMPDIR
os.environ.pop("RAY_ADDRESS", None)

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("unit", "integration", "e2e", "cluster")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in FOLDERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


def pytest_unconfigure(config):
    """Whatever Ray processes this session left (a crash, a timeout) are stopped by pid; nothing else is touched."""
    kill_pids(pids_using(RAY_TMPDIR))
    if not os.environ.get("PRISM_KEEP_RAY_LOGS"):  # set it to read the replicas' logs after a failure
        shutil.rmtree(RAY_TMPDIR, ignore_errors=True)
