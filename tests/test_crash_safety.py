"""SIGKILL at any moment of `rag ingest` leaves the previous index loadable, and a re-run completes."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rag.store import Store
from rag.types import ALL_COLLECTIONS
from tests.conftest import CORPUS


def _rag(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "RAG_PARSE_WORKERS": "2"}, **kwargs)


def _writer_active(index: Path) -> bool:
    """Whether another process holds the index's writer lock."""
    if not (index / ".lock").exists():
        return False
    with open(index / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _wait_for_writer(index: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    """Returns once the writer has begun (holds the writer lock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _writer_active(index):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the ingest never started writing")


def _assert_no_orphaned_workers(index: Path) -> None:
    """Parse workers must die with the killed ingest instead of lingering with ~0.5 GB each."""
    deadline = time.monotonic() + 30  # they exit on their parent's death (PR_SET_PDEATHSIG); a loaded machine is slow
    while time.monotonic() < deadline:
        # parse workers and the forkserver they are forked from (ingest/sandbox.py)
        orphans = subprocess.run(["pgrep", "-f", r"multiprocessing\.(spawn|forkserver)"], capture_output=True,
                                 text=True).stdout
        mine = [pid for pid in orphans.split() if int(pid) != os.getpid() and _parent(int(pid)) == 1]
        if not mine:
            return
        time.sleep(0.2)
    raise AssertionError(f"orphaned parse workers left running: {mine}")


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.2, 3.0])
def test_sigkill_mid_ingest_leaves_the_previous_snapshot_loadable(tmp_path, delay):
    source, index = tmp_path / "docs", tmp_path / "index"
    shutil.copytree(CORPUS / "httpx", source)
    seed = _rag("ingest", str(source / "advanced"), "--index", str(index), "--json")
    assert seed.wait(timeout=120) == 0, seed.communicate()
    before = Store.open(index).counts(collection=ALL_COLLECTIONS)

    (source / "ntsb").mkdir()
    for pdf in sorted((CORPUS / "ntsb").glob("*.pdf"))[:2]:
        shutil.copy(pdf, source / "ntsb" / pdf.name)
    process = _rag("ingest", str(source), "--index", str(index))
    _wait_for_writer(index, process)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    _assert_no_orphaned_workers(index)

    store = Store.open(index)  # loadable, consistent, and either the old snapshot or a complete new one
    counts = store.counts(collection=ALL_COLLECTIONS)
    assert counts["chunks"] == counts["vectors"]
    assert counts == before or process.returncode == 0

    rerun = _rag("ingest", str(source), "--index", str(index), "--json")
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr.decode()
    report = json.loads(stdout)
    after = Store.open(index).counts(collection=ALL_COLLECTIONS)
    assert after["documents"] == len(list(source.rglob("*.md"))) + len(list(source.rglob("*.pdf")))
    assert after == report["index"]
    # the killed writer's leftovers are cleaned up: every segment file is registered, no temp file remains
    registered = {row[0] for row in Store.open(index).db.execute("SELECT name FROM segments")}
    assert {path.name.removesuffix(".faiss") for path in (index / "segments").iterdir()} == registered
