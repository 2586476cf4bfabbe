"""The campus folders of `edufl simulate` (every campus's raw rows): private from creation,
removed when a run ends or is sent SIGTERM, and, after a SIGKILL, at the next start.

Every test uses its own folder of campus folders (the subprocesses get ``TMPDIR``),
so that none touches the folders of other runs on this machine.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from edufl.clients.node import SIM_MANIFEST
from edufl.experiments import simulate
from edufl.experiments.simulate import campus_folders, campus_root, remove_stale_campus_folders

pytestmark = pytest.mark.simulation

# The cheapest federated run: 7 module campuses, one round of the logistic model.
RUN = ["-m", "edufl.experiments.cli", "simulate", "--rounds", "1", "--model", "logistic"]
DEADLINE_S = 300  # to reach the event waited for; a loaded machine starts Ray slowly


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _owned_name(pid: int, started: float) -> str:
    """A campus folder name as a run of process ``pid`` (started at ``started``) would create it."""
    return f"{pid}-{round(started * 1000)}-test"


def _ended_process() -> psutil.Process:
    """A process that has ended (and been reaped), with its pid and start time."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    info = psutil.Process(child.pid)
    info.create_time()  # cached while the process exists
    child.wait()
    return info


def _start(data_dir: Path, tmp: Path, *args: str) -> subprocess.Popen:
    """`edufl simulate` in its own process group, its campus folders under ``tmp``."""
    env = {
        **os.environ,
        "EDUFL_DATA": str(data_dir),
        "TMPDIR": str(tmp),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    # Ray would put its sockets under TMPDIR too: keep them where they go without it (short paths).
    env.setdefault("RAY_TMPDIR", tempfile.gettempdir() if sys.platform.startswith("linux") else "/tmp")
    with (tmp / "simulate.log").open("w") as log:  # a file, not a pipe: nothing blocks on a full buffer
        return subprocess.Popen(
            [sys.executable, *RUN, "--out", str(tmp / "run"), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for_manifest(proc: subprocess.Popen, root: Path) -> Path:
    """The run's campus folder, once its campuses are written (the manifest is written last)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = [m.parent for m in root.glob(f"*/{SIM_MANIFEST}") if m.parent.name.startswith(f"{proc.pid}-")]
        if found:
            return found[0]
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before writing its campus folders"
        time.sleep(0.1)
    raise AssertionError(f"no {SIM_MANIFEST} under {root} after {DEADLINE_S} s")


def _end_group(proc: subprocess.Popen, tmp: Path) -> str:
    """Kill what is left of the run's process group (the engine's processes); returns the run's output."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=60)
    return (tmp / "simulate.log").read_text()


# In-process: the context manager every federated run uses.


def test_root_and_run_folder_are_private_from_creation_whatever_the_umask(tmp_path):
    old = os.umask(0)  # files created without an explicit mode would be world-readable
    try:
        with campus_folders(tmp_path) as folder:
            root = folder.parent
            assert root == campus_root(tmp_path) and root.parent == tmp_path
            assert _mode(root) == 0o700 and _mode(folder) == 0o700
            assert list(folder.iterdir()) == []
            me = psutil.Process()
            assert folder.name.startswith(f"{me.pid}-{round(me.create_time() * 1000)}-")
            (folder / "AAA").mkdir()
            (folder / "AAA" / "rows.parquet").write_bytes(b"rows")
        assert not folder.exists() and list(root.iterdir()) == []
    finally:
        os.umask(old)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_folder_removed_when_the_run_fails_or_is_interrupted(tmp_path, error):
    with pytest.raises(error), campus_folders(tmp_path) as folder:
        (folder / "rows.parquet").write_bytes(b"rows")
        raise error()
    assert not folder.exists()


def test_a_root_others_could_enter_is_refused(tmp_path):
    root = campus_root(tmp_path)
    root.chmod(0o755)
    with pytest.raises(PermissionError, match="not a private folder"), campus_folders(tmp_path):
        pass
    assert list(root.iterdir()) == []
    root.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    root.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError, match="not a private folder"):
        campus_root(tmp_path)


def test_start_removes_only_folders_whose_owner_has_ended(tmp_path, capsys):
    root = campus_root(tmp_path)
    me, ended = psutil.Process(), _ended_process()
    live = root / _owned_name(me.pid, me.create_time())
    stale = [
        root / _owned_name(ended.pid, ended.create_time()),  # the owner has ended
        root / _owned_name(me.pid, me.create_time() - 3600),
    ]  # its pid now runs another process
    other = root / "not-a-campus-folder"
    for folder in (live, *stale, other):
        folder.mkdir(mode=0o700)
        (folder / "rows.parquet").write_bytes(b"rows")
    with campus_folders(tmp_path) as mine:
        out = capsys.readouterr().out
        assert "removed 2 campus folders " in out and out.count("\n") == 1  # how many, no contents
        assert sorted(root.iterdir()) == sorted([live, other, mine])
        with campus_folders(tmp_path):  # nothing stale left: nothing said
            pass
        assert capsys.readouterr().out == "" and mine.exists()
    assert sorted(root.iterdir()) == sorted([live, other])


def test_start_line_says_how_many(tmp_path, capsys):
    root, ended = campus_root(tmp_path), _ended_process()
    for i in range(2):
        (root / f"{ended.pid}-{round(ended.create_time() * 1000)}-{i}").mkdir(mode=0o700)
    assert remove_stale_campus_folders(root) == 2
    (root / f"{ended.pid}-{round(ended.create_time() * 1000)}-x").mkdir(mode=0o700)
    with campus_folders(tmp_path):
        pass
    out = capsys.readouterr().out
    assert "removed 1 campus folder " in out and out.count("\n") == 1


def _recording_handler(calls: list):
    def handler(signum, frame):
        calls.append(signum)

    return handler


def _wait_for_signal(deadline_s: float = 10) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        time.sleep(0.01)  # the handler runs here
    raise AssertionError("SIGTERM was not handled")


def test_sigterm_removes_the_folder_then_reaches_the_previous_handler(tmp_path):
    calls: list = []
    recorder = _recording_handler(calls)
    previous = signal.signal(signal.SIGTERM, recorder)
    try:
        with pytest.raises(SystemExit) as exited, campus_folders(tmp_path) as folder:
            assert signal.getsignal(signal.SIGTERM) is not recorder
            (folder / "rows.parquet").write_bytes(b"rows")
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for_signal()
        assert exited.value.code == 128 + signal.SIGTERM
        assert not folder.exists()
        assert calls == [signal.SIGTERM]  # raised again, once, for the handler the run found
        assert signal.getsignal(signal.SIGTERM) is recorder
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_removal_waits_until_the_folder_is_gone(tmp_path, monkeypatch):
    calls: list = []
    rmtree = simulate.shutil.rmtree

    def removal_interrupted(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, before the rows are removed
        rmtree(path, *args, **kwargs)

    previous = signal.signal(signal.SIGTERM, _recording_handler(calls))
    try:
        with campus_folders(tmp_path) as folder:
            (folder / "rows.parquet").write_bytes(b"rows")
            monkeypatch.setattr(simulate.shutil, "rmtree", removal_interrupted)
        assert not folder.exists()
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_no_sigterm_handler_outside_the_main_thread(tmp_path):
    seen = []

    def run():
        with campus_folders(tmp_path) as folder:
            seen.append((signal.getsignal(signal.SIGTERM), folder.exists()))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [(before, True)]


# A real `edufl simulate`, in its own process.


def test_sigkilled_run_leaves_a_private_folder_that_the_next_start_removes(data_dir, tmp_path):
    root = campus_root(tmp_path)
    proc = _start(data_dir, tmp_path)
    try:
        with campus_folders(tmp_path) as live:  # a folder owned by this (live) process
            folder = _wait_for_manifest(proc, root)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            assert folder.is_dir() and (folder / SIM_MANIFEST).is_file()  # SIGKILL: no cleanup
            assert _mode(root) == 0o700 and _mode(folder) == 0o700
            assert any(p.suffix == ".parquet" for p in folder.rglob("*"))
            # What the next start runs (campus_folders) before writing anything:
            assert remove_stale_campus_folders(root) == 1
            assert not folder.exists() and live.is_dir()
            assert sorted(root.iterdir()) == [live]
    finally:
        _end_group(proc, tmp_path)
    assert list(root.iterdir()) == []


def test_finished_run_removes_its_folder_and_a_stale_one(data_dir, tmp_path):
    root, ended = campus_root(tmp_path), _ended_process()
    stale = root / _owned_name(ended.pid, ended.create_time())
    stale.mkdir(mode=0o700)
    (stale / SIM_MANIFEST).write_text("{}")
    me = psutil.Process()
    live = root / _owned_name(me.pid, me.create_time())
    live.mkdir(mode=0o700)
    proc = _start(data_dir, tmp_path)
    try:
        proc.wait(timeout=900)
    finally:
        out = _end_group(proc, tmp_path)
    assert proc.returncode == 0, out[-3000:]
    assert "removed 1 campus folder " in out and "round   1/1" in out
    assert (tmp_path / "run" / "summary.json").is_file()
    assert sorted(root.iterdir()) == [live]  # its own folder is gone; a live process's is kept


def test_sigterm_run_removes_its_folder_and_ends(data_dir, tmp_path):
    root = campus_root(tmp_path)
    proc = _start(data_dir, tmp_path)
    try:
        folder = _wait_for_manifest(proc, root)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)  # the engine's ServerApp thread must not keep it alive
    finally:
        out = _end_group(proc, tmp_path)
    assert proc.returncode == -signal.SIGTERM, out[-3000:]
    assert not folder.exists() and list(root.iterdir()) == []
