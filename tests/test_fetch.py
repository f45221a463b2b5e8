"""The fetch stage against local mirrors: directories and an HTTP server on loopback."""

import functools
import gzip
import hashlib
import http.server
import shutil
import threading

import pytest

from stages import fetch
from stages.common import PipelineError
from tests.conftest import HAVE_MNIST, MNIST_MIRROR

# Four tiny stand-ins for the MNIST files, with their hashes patched into fetch.FILES.
CONTENT = {name: f"content of {name}".encode() for name in fetch.FILES}


@pytest.fixture
def fake_files(monkeypatch):
    monkeypatch.setattr(
        fetch, "FILES", {n: hashlib.sha256(c).hexdigest() for n, c in CONTENT.items()}
    )


def make_mirror(path, broken=None, how="corrupt"):
    """A directory mirror; `broken` names one file served wrong (`how`: corrupt, truncated)."""
    path.mkdir()
    for name, content in CONTENT.items():
        data = gzip.compress(content)
        if name == broken and how == "corrupt":
            data = gzip.compress(content + b"!")
        if name == broken and how == "truncated":
            data = data[: len(data) // 2]
        (path / name).write_bytes(data)
    return path


@pytest.fixture
def http_mirror(tmp_path):
    """Serves a good mirror directory at http://127.0.0.1:<port>/."""
    root = make_mirror(tmp_path / "served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_fetch_from_a_directory_mirror(tmp_path, fake_files):
    mirror = make_mirror(tmp_path / "mirror")
    sources = fetch.fetch([str(mirror)], tmp_path / "raw", timeout_s=5)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(CONTENT)
    assert set(sources.values()) == {str(mirror)}


def test_unreachable_mirror_is_skipped_for_a_good_http_one(tmp_path, fake_files, http_mirror):
    unreachable = "http://127.0.0.1:9/"  # discard port: connection refused
    sources = fetch.fetch([unreachable, http_mirror], tmp_path / "raw", timeout_s=5)
    assert set(sources.values()) == {http_mirror}
    name = "t10k-labels-idx1-ubyte.gz"
    assert gzip.decompress((tmp_path / "raw" / name).read_bytes()) == CONTENT[name]


class CutShortHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 10, hangs up: a connection dropped mid-download."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")

    def log_message(self, *args):
        pass


def test_download_cut_short_is_rejected_and_the_next_mirror_used(tmp_path, fake_files):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShortHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cut = f"http://127.0.0.1:{server.server_address[1]}/"
    good = make_mirror(tmp_path / "good")
    try:
        sources = fetch.fetch([cut, str(good)], tmp_path / "raw", timeout_s=5)
        assert set(sources.values()) == {str(good)}
        with pytest.raises(PipelineError) as error:
            fetch.fetch([cut], tmp_path / "raw2", timeout_s=5)
    finally:
        server.shutdown()
    assert f"{cut} (download cut short after 10 of 1000 bytes)" in str(error.value)
    assert not (tmp_path / "raw2").exists()


def test_checksum_mismatch_falls_back_to_the_next_mirror(tmp_path, fake_files):
    bad = make_mirror(tmp_path / "bad", broken="train-labels-idx1-ubyte.gz")
    good = make_mirror(tmp_path / "good")
    sources = fetch.fetch([str(bad), str(good)], tmp_path / "raw", timeout_s=5)
    assert sources["train-labels-idx1-ubyte.gz"] == str(good)
    assert sources["train-images-idx3-ubyte.gz"] == str(bad)


def test_no_working_mirror_lists_each_failure_and_writes_nothing(tmp_path, fake_files):
    name = "train-images-idx3-ubyte.gz"
    corrupt = make_mirror(tmp_path / "corrupt", broken=name)
    truncated = make_mirror(tmp_path / "truncated", broken=name, how="truncated")
    missing = tmp_path / "missing"
    with pytest.raises(PipelineError) as error:
        fetch.fetch(
            [str(corrupt), str(truncated), str(missing), "http://127.0.0.1:9/"],
            tmp_path / "raw",
            timeout_s=5,
        )
    want = hashlib.sha256(CONTENT[name]).hexdigest()[:12]
    got = hashlib.sha256(CONTENT[name] + b"!").hexdigest()[:12]
    # The OS's and zlib's own words (after our "(") differ between platforms: not pinned.
    message = str(error.value)
    assert message.startswith(f"no mirror served a valid {name}: ")
    assert message.endswith(
        ". Set MNIST_MIRROR to a directory or URL holding the four MNIST .gz files"
    )
    reasons = message.split(": ", 1)[1].split("; ")
    assert reasons[0] == f"{corrupt} (sha256 mismatch (got {got}…, want {want}…))"
    assert reasons[1].startswith(f"{truncated} (not a complete gzip file (")
    assert reasons[2] == f"{missing} (file not found)"
    assert reasons[3].startswith("http://127.0.0.1:9/ (unreachable (")
    assert list(tmp_path.glob("raw*")) == []
    assert list(tmp_path.glob(".raw*")) == []  # no temporary directory left either


def test_failed_fetch_keeps_the_previous_output(tmp_path, fake_files):
    good = make_mirror(tmp_path / "good")
    fetch.fetch([str(good)], tmp_path / "raw", timeout_s=5)
    shutil.rmtree(good)
    with pytest.raises(PipelineError):
        fetch.fetch([str(good)], tmp_path / "raw", timeout_s=5)
    assert len(list((tmp_path / "raw").iterdir())) == 4


def test_mnist_mirror_env_comes_first():
    env = {"MNIST_MIRROR": "/srv/mnist"}
    assert fetch.mirror_list(["https://a/", "https://b/"], env) == [
        "/srv/mnist",
        "https://a/",
        "https://b/",
    ]
    assert fetch.mirror_list(["https://a/"], {}) == ["https://a/"]


@pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")
def test_the_real_mnist_files_verify(tmp_path):
    sources = fetch.fetch([str(MNIST_MIRROR)], tmp_path / "raw", timeout_s=5)
    assert sorted(sources) == sorted(fetch.FILES)
