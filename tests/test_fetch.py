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
from tests.conftest import HAVE_MNIST, MNIST_MIRROR, ROOT

MNIST = fetch.load_description(ROOT / "data" / "mnist.yaml")
# Four tiny stand-ins for the MNIST files, in a description with their checksums.
CONTENT = {name: f"content of {name}".encode() for name in MNIST.checksums}
FAKE = MNIST.model_copy(
    update={"checksums": {n: f"sha256:{hashlib.sha256(c).hexdigest()}" for n, c in CONTENT.items()}}
)


@pytest.fixture
def fake_files():
    """fetch(mirrors, out) of the fake description."""
    return lambda mirrors, out, timeout_s=5: fetch.fetch_idx(FAKE, mirrors, out, timeout_s)


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
    sources = fake_files([str(mirror)], tmp_path / "raw", timeout_s=5)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(
        [*CONTENT, "dataset.json"]
    )
    assert set(sources.values()) == {str(mirror)}


def test_unreachable_mirror_is_skipped_for_a_good_http_one(tmp_path, fake_files, http_mirror):
    unreachable = "http://127.0.0.1:9/"  # discard port: connection refused
    sources = fake_files([unreachable, http_mirror], tmp_path / "raw", timeout_s=5)
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
        sources = fake_files([cut, str(good)], tmp_path / "raw", timeout_s=5)
        assert set(sources.values()) == {str(good)}
        with pytest.raises(PipelineError) as error:
            fake_files([cut], tmp_path / "raw2", timeout_s=5)
    finally:
        server.shutdown()
    assert f"{cut} (download cut short after 10 of 1000 bytes)" in str(error.value)
    assert not (tmp_path / "raw2").exists()


def test_checksum_mismatch_falls_back_to_the_next_mirror(tmp_path, fake_files):
    bad = make_mirror(tmp_path / "bad", broken="train-labels-idx1-ubyte.gz")
    good = make_mirror(tmp_path / "good")
    sources = fake_files([str(bad), str(good)], tmp_path / "raw", timeout_s=5)
    assert sources["train-labels-idx1-ubyte.gz"] == str(good)
    assert sources["train-images-idx3-ubyte.gz"] == str(bad)


def test_no_working_mirror_lists_each_failure_and_writes_nothing(tmp_path, fake_files):
    name = "train-images-idx3-ubyte.gz"
    corrupt = make_mirror(tmp_path / "corrupt", broken=name)
    truncated = make_mirror(tmp_path / "truncated", broken=name, how="truncated")
    missing = tmp_path / "missing"
    with pytest.raises(PipelineError) as error:
        fake_files(
            [str(corrupt), str(truncated), str(missing), "http://127.0.0.1:9/"],
            tmp_path / "raw",
            timeout_s=5,
        )
    want = hashlib.sha256(CONTENT[name]).hexdigest()[:12]
    got = hashlib.sha256(CONTENT[name] + b"!").hexdigest()[:12]
    # The OS's and zlib's own words (after our "(") differ between platforms: not pinned.
    message = str(error.value)
    assert message.startswith(f"no mirror served a valid {name}: ")
    assert message.endswith(". Set MNIST_MIRROR to a directory or URL holding the dataset's files")
    reasons = message.split(": ", 1)[1].split("; ")
    assert reasons[0] == f"{corrupt} (sha256 mismatch (got {got}…, want {want}…))"
    assert reasons[1].startswith(f"{truncated} (not a complete gzip file (")
    assert reasons[2] == f"{missing} (file not found)"
    assert reasons[3].startswith("http://127.0.0.1:9/ (unreachable (")
    assert list(tmp_path.glob("raw*")) == []
    assert list(tmp_path.glob(".raw*")) == []  # no temporary directory left either


def test_failed_fetch_keeps_the_previous_output(tmp_path, fake_files):
    good = make_mirror(tmp_path / "good")
    fake_files([str(good)], tmp_path / "raw", timeout_s=5)
    shutil.rmtree(good)
    with pytest.raises(PipelineError):
        fake_files([str(good)], tmp_path / "raw", timeout_s=5)
    assert len(list((tmp_path / "raw").iterdir())) == 5  # four files and dataset.json


def test_the_description_s_mirror_env_comes_first():
    two = MNIST.model_copy(update={"mirrors": ("https://a/", "https://b/")})
    assert fetch.mirror_list(two, {"MNIST_MIRROR": "/srv/mnist"}) == [
        "/srv/mnist",
        "https://a/",
        "https://b/",
    ]
    assert fetch.mirror_list(two, {"KMNIST_MIRROR": "/srv/k"}) == ["https://a/", "https://b/"]


def test_an_md5_checksum_is_of_the_file_as_served(tmp_path):
    """Fashion-MNIST and Kuzushiji-MNIST publish the MD5 of each .gz file."""
    mirror = make_mirror(tmp_path / "mirror")
    md5 = {n: hashlib.md5((mirror / n).read_bytes()).hexdigest() for n in CONTENT}
    described = FAKE.model_copy(update={"checksums": {n: f"md5:{h}" for n, h in md5.items()}})
    fetch.fetch_idx(described, [str(mirror)], tmp_path / "raw", 5)
    name = "train-images-idx3-ubyte.gz"
    (mirror / name).write_bytes(gzip.compress(CONTENT[name], mtime=1))  # same content, other bytes
    with pytest.raises(PipelineError) as error:
        fetch.fetch_idx(described, [str(mirror)], tmp_path / "raw2", 5)
    assert f"{mirror} (md5 mismatch (got " in str(error.value)
    assert f"want {md5[name][:12]}…))" in str(error.value)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
def test_each_shipped_description_is_complete(name):
    described = fetch.load_description(ROOT / "data" / f"{name}.yaml")
    assert described.name == name
    assert len(described.classes) == 10
    assert sorted(described.checksums) == sorted([*described.train, *described.test])
    assert described.preparation == ("digits" if name == "mnist" else "resize")


def test_a_broken_description_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nclasses: [a]\npreparation: digits\n")
    with pytest.raises(PipelineError) as error:
        fetch.load_description(bad)
    message = str(error.value)
    assert message == (
        f"{bad} is not a dataset description (classes must be a list of at least 2 items, "
        "each a string, got ['a']; missing key mirror_env; missing key mirrors; "
        "missing key train; missing key test; missing key checksums)"
    )


@pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")
def test_the_real_mnist_files_verify(tmp_path):
    sources = fetch.fetch_idx(MNIST, [str(MNIST_MIRROR)], tmp_path / "raw", 5)
    assert sorted(sources) == sorted(MNIST.checksums)
