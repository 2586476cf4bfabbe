"""`edufl data download`: the release's files checked by row count and SHA-256, installed whole or not at all."""

from __future__ import annotations

import functools
import hashlib
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edufl.experiments.oulad import OULAD_RELEASE_SHA256, download
from edufl.federation.mapping import load_mapping
from edufl.federation.problems import DataError


def _archive(data_dir: Path, path: Path, change: dict[str, bytes] | None = None) -> Path:
    # The release's layout (one folder in the zip) from the shared copy, with some files' bytes replaced.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name in load_mapping().files():
            zf.writestr(f"anonymisedData/{name}", (change or {}).get(name) or (data_dir / name).read_bytes())
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An HTTP server on 127.0.0.1 serving a folder: yields (folder, base URL)."""
    folder = tmp_path_factory.mktemp("served")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def _installed(dest: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dest.iterdir()}


def test_known_hashes_are_those_of_the_release_files(data_dir):
    assert {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in OULAD_RELEASE_SHA256} == (
        OULAD_RELEASE_SHA256
    )


def test_download_over_http_installs_every_file_and_replaces_a_previous_copy(data_dir, served, tmp_path):
    folder, base = served
    _archive(data_dir, folder / "good.zip")
    dest = tmp_path / "cache" / "oulad"
    dest.mkdir(parents=True)
    (dest / "old.txt").write_text("a previous download")
    assert download(f"{base}/good.zip", dest) == dest
    assert _installed(dest) == {
        name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in load_mapping().files()
    }
    assert sorted(p.name for p in dest.parent.iterdir()) == ["oulad"]  # no staging folder left behind


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        # Same rows, one changed value: only the hash tells.
        (lambda d: {"courses.csv": (d / "courses.csv").read_bytes().replace(b"268", b"269", 1)}, "courses.csv: has SHA-256 "),
        (
            lambda d: {"assessments.csv": (d / "assessments.csv").read_bytes().rsplit(b"\n", 2)[0] + b"\n"},
            "official release has 206",
        ),
    ],
)
def test_a_corrupted_file_is_named_and_nothing_is_installed(data_dir, served, tmp_path, corrupt, problem):
    folder, base = served
    name = f"bad-{len(list(folder.iterdir()))}.zip"
    _archive(data_dir, folder / name, corrupt(data_dir))
    dest = tmp_path / "cache" / "oulad"
    dest.mkdir(parents=True)
    (dest / "old.txt").write_text("a previous download")
    with pytest.raises(DataError) as raised:
        download(f"{base}/{name}", dest)
    assert problem in str(raised.value)
    assert _installed(dest) == {"old.txt": hashlib.sha256(b"a previous download").hexdigest()}  # the previous copy, untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["oulad"]


def test_a_truncated_archive_is_refused_and_nothing_is_installed(data_dir, tmp_path):
    whole = _archive(data_dir, tmp_path / "whole.zip")
    (tmp_path / "cut.zip").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    dest = tmp_path / "cache" / "oulad"
    with pytest.raises(DataError, match="not a readable zip archive"):
        download((tmp_path / "cut.zip").as_uri(), dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_an_unreachable_address_says_download_failed(tmp_path):
    dest = tmp_path / "cache" / "oulad"
    with pytest.raises(DataError, match="download failed"):
        download((tmp_path / "missing.zip").as_uri(), dest)
    assert not dest.exists()
