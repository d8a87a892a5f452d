"""Downloads against a local HTTP server on 127.0.0.1 only: full, resumed (Range),
interrupted, corrupted, no network; plus `rabbit data fetch/info` and path resolution."""
import hashlib
import http.server
import socket
import threading
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from rabbitkit.data import cache as array_cache
from rabbitkit.data import fetch, paths
from rabbitkit.data.cli import data_group
from rabbitkit.data.fetch import Remote, download
from rabbitkit.errors import DataError

PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("RABBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RABBIT_DATA", raising=False)
    monkeypatch.delenv("RABBIT_OFFLINE", raising=False)


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.payload; honours Range unless told not to; can cut a response short."""

    def do_GET(self):
        server = self.server
        server.ranges.append(self.headers.get("Range"))
        body, start = server.payload, 0
        if self.headers.get("Range") and not server.ignore_range:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        rest = body[start:]
        if server.cut_after:  # announce everything, send only part, drop the connection
            rest, server.cut_after = rest[:server.cut_after], 0
        self.wfile.write(rest)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.payload, httpd.ranges, httpd.ignore_range, httpd.cut_after = PAYLOAD, [], False, 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def remote_for(httpd, payload=PAYLOAD, **kw):
    url = f"http://127.0.0.1:{httpd.server_address[1]}/data.bin"
    return Remote("data.bin", url, sha256=hashlib.sha256(payload).hexdigest(), **kw)


def test_full_download_is_verified(server, tmp_path):
    dest = download(remote_for(server, size=len(PAYLOAD)), tmp_path / "d" / "data.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD and server.ranges == [None]
    assert not (tmp_path / "d" / "data.bin.part").exists()
    download(remote_for(server), dest, progress=False)  # a good copy is kept: no request
    assert server.ranges == [None]


def test_resume_after_truncation(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:123_456])
    download(remote_for(server), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD and server.ranges == ["bytes=123456-"]


def test_interrupted_transfer_resumes(server, tmp_path):
    server.cut_after = 100_000
    dest = download(remote_for(server), tmp_path / "data.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == [None, "bytes=100000-"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:5000])
    assert download(remote_for(server), tmp_path / "data.bin", progress=False).read_bytes() == PAYLOAD


def test_corrupt_partial_is_restarted_from_zero(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(b"x" * 1000)  # resumed onto garbage: checksum fails
    dest = download(remote_for(server), tmp_path / "data.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD and server.ranges == ["bytes=1000-", None]


def test_corrupted_download_is_refused(server, tmp_path):
    server.payload = PAYLOAD[:-1] + b"\x00"
    with pytest.raises(DataError) as err:
        download(remote_for(server, md5=hashlib.md5(PAYLOAD).hexdigest()), tmp_path / "data.bin", progress=False)
    message = str(err.value)
    assert "data.bin is corrupt (SHA-256" in message and "expected " + hashlib.sha256(PAYLOAD).hexdigest() in message
    assert "\n" not in message
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()


def test_wrong_size_and_format(server, tmp_path):
    with pytest.raises(DataError, match="size 300000 bytes, expected 5"):
        download(replace(remote_for(server), size=5), tmp_path / "a.bin", progress=False)
    with pytest.raises(DataError, match="not a zip archive"):
        download(replace(remote_for(server), archive="zip"), tmp_path / "b.bin", progress=False)


def test_no_network(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = Remote("x.zip", f"http://127.0.0.1:{port}/x.zip")
    with pytest.raises(DataError) as err:
        download(remote, tmp_path / "x.zip", progress=False, timeout=5)
    message = str(err.value)
    assert "cannot download" in message and f"put x.zip into {tmp_path}" in message and "RABBIT_DATA" in message


def test_fetch_command_and_automatic_download(server, tmp_path, monkeypatch):
    monkeypatch.setitem(fetch.SOURCES, "toy", (remote_for(server),))
    result = CliRunner().invoke(data_group, ["fetch", "toy", "--dest", str(tmp_path / "here")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "here" / "data.bin").read_bytes() == PAYLOAD
    # a factory finding nothing locally downloads into the per-user folder ...
    found = fetch.ensure_available("toy")
    assert found == paths.download_dir("toy") and (found / "data.bin").read_bytes() == PAYLOAD
    # ... unless offline, where it says how to provide the data
    monkeypatch.setenv("RABBIT_OFFLINE", "1")
    monkeypatch.setenv("RABBIT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RABBIT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError) as err:
        fetch.ensure_available("toy")
    first, fix = str(err.value).splitlines()
    assert first == (f"dataset 'toy' not found (looked in {tmp_path / 'data' / 'toy'} and "
                     f"{tmp_path / 'empty-cache' / 'datasets' / 'toy'}; downloads are off: $RABBIT_OFFLINE is set)")
    assert fix == f"  fix: put data.bin into {tmp_path / 'empty-cache' / 'datasets' / 'toy'}  (or --set data.path=PATH to a copy)"
    with pytest.raises(DataError, match="\n  fix: rabbit data fetch toy  \\(or --set data.path=PATH to a copy\\)$"):
        monkeypatch.delenv("RABBIT_OFFLINE")
        fetch.ensure_available("toy", download=False)
    result = CliRunner().invoke(data_group, ["fetch", "nope"])
    assert result.exit_code == 1 and "no download known for dataset 'nope'" in result.output


def test_published_checksums_are_in_the_table():
    assert {r.filename for r in fetch.SOURCES["gtsrb"]} == {
        "GTSRB_Final_Training_Images.zip", "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip"}
    assert all(r.md5 and r.url.startswith("https://") for rs in fetch.SOURCES.values() for r in rs)
    assert fetch.SOURCES["cifar10"][0].md5 == "c32a1d4ab5d03f1284b67883e8d87530"


def test_info_command(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("RABBIT_DATA", str(tmp_path / "data"))
    result = CliRunner().invoke(data_group, ["info", "gtsrb"])
    assert result.exit_code == 1 and "dataset 'gtsrb' not found" in result.output  # 'info' never downloads
    text = shared_data / "text" / "tinyshakespeare.txt"
    result = CliRunner().invoke(data_group, ["info", "text", "--path", str(text)])
    assert result.exit_code == 0 and "vocabulary of 65 characters" in result.output
    result = CliRunner().invoke(data_group, ["info", "gtsrbb"])
    assert "did you mean 'gtsrb'" in result.output


def test_path_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("RABBIT_DATA", str(tmp_path / "data"))
    assert paths.resolve("toy") is None
    paths.download_dir("toy").mkdir(parents=True)
    (paths.download_dir("toy") / "a").write_text("x")
    assert paths.resolve("toy") == paths.download_dir("toy")
    (tmp_path / "data" / "toy").mkdir(parents=True)
    (tmp_path / "data" / "toy" / "b").write_text("x")
    assert paths.resolve("toy") == tmp_path / "data" / "toy"
    assert paths.resolve("toy", str(tmp_path)) == tmp_path
    monkeypatch.delenv("RABBIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_root() == tmp_path / "xdg" / "rabbitkit"


def test_cache_writes_atomically(tmp_path, monkeypatch):
    parts = {"k": 1}
    arrays = {"a": np.arange(5), "names": np.array(["x", "yz"])}
    assert array_cache.load_or_build("toy", parts, lambda: arrays)["a"].tolist() == list(range(5))
    file = array_cache.cache_file("toy", parts)
    loaded = array_cache.read_arrays(file)
    assert loaded["names"].tolist() == ["x", "yz"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted in the middle of writing

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        array_cache.load_or_build("toy", {"k": 2}, lambda: arrays)
    assert sorted(p.name for p in file.parent.iterdir()) == [file.name]  # no temporary left behind
    monkeypatch.undo()
    file.write_bytes(file.read_bytes()[:50])  # a damaged entry is rebuilt
    rebuilt = array_cache.load_or_build("toy", parts, lambda: {"a": np.arange(3)})
    assert rebuilt["a"].tolist() == [0, 1, 2]
