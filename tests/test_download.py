"""Downloads: success, HTTP errors, cut-off transfers, stalls, checksum mismatches.

Only loopback is ever contacted: a tiny http.server on 127.0.0.1, file:// URLs, and a
guard that refuses any other address for the whole module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from ssd4rec.data import sources
from ssd4rec.data.download import RemoteFile, download
from ssd4rec.data.readers import read_inter
from ssd4rec.data.sources import ensure_dataset
from ssd4rec.errors import SSD4RecError

PAYLOAD = bytes(range(256)) * 300  # 76,800 bytes


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail any attempt to reach a host other than loopback."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        host = address[0]
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"test tried to reach {host}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.routes.get(self.path)
        if self.path == "/cut":  # promises the whole payload, sends a tenth, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 10])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path == "/stall":  # sends headers and a little, then goes silent
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:100])
            self.wfile.flush()
            time.sleep(3)
            return
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    Handler.routes = {"/ok.bin": PAYLOAD}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_ok_with_checksums(server, tmp_path):
    remote = RemoteFile(f"{server}/ok.bin", "ok.bin", md5=hashlib.md5(PAYLOAD).hexdigest(),
                        sha256=hashlib.sha256(PAYLOAD).hexdigest())
    dest = download(remote, tmp_path / "sub" / "ok.bin", progress=False, timeout=5)
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(tmp_path / "sub") == ["ok.bin"]


def test_download_without_recorded_checksum_prints_sha256(server, tmp_path, capsys):
    download(RemoteFile(f"{server}/ok.bin", "ok.bin"), tmp_path / "ok.bin", progress=True, timeout=5)
    assert hashlib.sha256(PAYLOAD).hexdigest() in capsys.readouterr().err


@pytest.mark.parametrize("path, message", [
    ("/missing.bin", "HTTP 404"),
    ("/cut", "was cut off: got 7680 of 76800 bytes"),
    ("/stall", "timed out: no data for 0.5 s"),
])
def test_failed_download_leaves_nothing(server, tmp_path, path, message):
    dest = tmp_path / "d" / "file.bin"
    start = time.monotonic()
    with pytest.raises(SSD4RecError, match=message) as exc:
        download(RemoteFile(server + path, "file.bin"), dest, progress=False, timeout=0.5)
    assert time.monotonic() - start < 10
    assert server + path in str(exc.value)
    assert str(dest) in str(exc.value)  # where to put a copy fetched by hand
    assert leftovers(tmp_path / "d") == []


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    dest = tmp_path / "ok.bin"
    with pytest.raises(SSD4RecError, match="wrong md5 checksum: expected 0+, got"):
        download(RemoteFile(f"{server}/ok.bin", "ok.bin", md5="0" * 32), dest, progress=False, timeout=5)
    with pytest.raises(SSD4RecError, match="wrong sha256 checksum"):
        download(RemoteFile(f"{server}/ok.bin", "ok.bin", sha256="f" * 64), dest, progress=False, timeout=5)
    assert leftovers(tmp_path) == []


def test_unreachable_host(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused, like being offline
    url = f"http://127.0.0.1:{port}/ml-1m.zip"
    with pytest.raises(SSD4RecError, match="offline, or the host is unreachable") as exc:
        download(RemoteFile(url, "ml-1m.zip"), tmp_path / "ml-1m.zip", progress=False, timeout=2)
    assert url in str(exc.value)
    assert leftovers(tmp_path) == []


def test_file_urls_and_bad_urls(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    got = download(RemoteFile(src.as_uri(), "x"), tmp_path / "out" / "x.bin", progress=False)
    assert got.read_bytes() == PAYLOAD
    with pytest.raises(SSD4RecError, match="nope.bin"):
        download(RemoteFile((tmp_path / "nope.bin").as_uri(), "x"), tmp_path / "out" / "y.bin", progress=False)
    with pytest.raises(SSD4RecError, match="cannot download 'not a url'"):
        download(RemoteFile("not a url", "x"), tmp_path / "out" / "z.bin", progress=False)
    assert leftovers(tmp_path / "out") == ["x.bin"]


def _ml1m_zip_bytes(tmp_path: Path) -> bytes:
    lines = "".join(f"{u}::{i}::4::{1000 * u + i}\n" for u in range(1, 7) for i in range(1, 6))
    path = tmp_path / "fixture.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", lines)
    return path.read_bytes()


def _point_ml1m_at(monkeypatch, url: str, md5: str | None):
    spec = sources.DATASETS["ml-1m"]
    rel = dataclasses.replace(spec.releases[0], remote=RemoteFile(url, "ml-1m.zip", md5=md5))
    monkeypatch.setitem(sources.DATASETS, "ml-1m", dataclasses.replace(spec, releases=(rel,)))


def test_ensure_dataset_downloads_then_builds(server, tmp_path, monkeypatch):
    data = _ml1m_zip_bytes(tmp_path)
    Handler.routes["/ml-1m.zip"] = data
    _point_ml1m_at(monkeypatch, f"{server}/ml-1m.zip", hashlib.md5(data).hexdigest())
    out = tmp_path / "datasets"
    assert ensure_dataset("ml-1m", str(out), download=True, progress=False) == str(out)
    assert (out / "ml-1m" / "ml-1m.zip").read_bytes() == data  # kept: a rebuild needs no download
    assert len(read_inter(out / "ml-1m" / "ml-1m.inter")) == 30


def test_ensure_dataset_download_failure_names_url_and_destination(server, tmp_path, monkeypatch):
    data = _ml1m_zip_bytes(tmp_path)
    Handler.routes["/ml-1m.zip"] = data
    out = tmp_path / "datasets"
    _point_ml1m_at(monkeypatch, f"{server}/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906")
    with pytest.raises(SSD4RecError, match="wrong md5 checksum") as exc:
        ensure_dataset("ml-1m", str(out), download=True, progress=False)
    assert str(out / "ml-1m" / "ml-1m.zip") in str(exc.value)
    _point_ml1m_at(monkeypatch, f"{server}/gone.zip", None)
    with pytest.raises(SSD4RecError, match="HTTP 404"):
        ensure_dataset("ml-1m", str(out), download=True, progress=False)
    assert leftovers(out / "ml-1m") == []


def test_registry_urls_are_the_official_ones():
    urls = {name: [r.remote.url for r in spec.releases if r.remote] for name, spec in sources.DATASETS.items()}
    assert urls["ml-1m"] == ["https://files.grouplens.org/datasets/movielens/ml-1m.zip"]
    assert sources.DATASETS["ml-1m"].releases[0].remote.md5 == "c4d9eecfca2ab87c1945afe126590906"
    assert "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz" in urls["amazon-beauty"]
    assert urls["amazon-video-games"][0] == (
        "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/categoryFilesSmall/Video_Games_5.json.gz")
    assert urls["kuairand"] == ["https://zenodo.org/records/10439422/files/KuaiRand-Pure.tar.gz"]
    assert all(u.startswith("https://") for us in urls.values() for u in us)
