"""Shared test helpers: the project root, params files with overrides, tiny datasets."""

import contextlib
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock

from tools.paths import set_params

ROOT = Path(__file__).resolve().parents[1]
SHARED_MIRROR = ROOT.parent / "shared" / "datasets" / "mnist"  # CI lays shared/ there
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnist-dvc"


def find_mnist():
    """The four MNIST files for the tests that need real digits: $MNIST_MIRROR, else the
    offline mirror beside the checkout, else a user cache that the fetch stage's own code
    fills once from params.yaml's public mirrors (verified). Returns (dir, why not)."""
    if os.environ.get("MNIST_MIRROR"):
        return Path(os.environ["MNIST_MIRROR"]), None
    if SHARED_MIRROR.is_dir():
        return SHARED_MIRROR, None
    cache = USER_CACHE / "mnist"
    if not cache.is_dir() and not os.environ.get("REQUIRE_MNIST_MIRROR"):
        from stages import fetch
        from stages.common import PipelineError

        try:
            mnist = fetch.load_description(ROOT / "data" / "mnist.yaml")
            fetch.fetch_idx(mnist, mnist.mirrors, cache, timeout_s=20)
        except PipelineError as e:
            return cache, f"MNIST not found and not downloadable ({e})"
    return cache, None


MNIST_MIRROR, WHY_NO_MNIST = find_mnist()
# Tests that need the real files skip without them, unless REQUIRE_MNIST_MIRROR is set (CI).
HAVE_MNIST = MNIST_MIRROR.is_dir() or bool(os.environ.get("REQUIRE_MNIST_MIRROR"))


def pytest_report_header():
    if HAVE_MNIST:
        return f"MNIST files: {MNIST_MIRROR}"
    return f"MNIST files: none, tests that need them skip. {WHY_NO_MNIST}"


def write_params(path, source=ROOT / "params.yaml", **overrides):
    """Writes params.yaml at `path` from `source` (default: the project's), with overrides
    like train__epochs=1; returns the params as a dict."""
    if Path(path) != Path(source):
        shutil.copyfile(source, path)
    edit_params(path, **overrides)
    return yaml.safe_load(Path(path).read_text())


# What a user's clone holds that the pipeline needs: tests copy these into temporary
# git repositories to run real `dvc` commands.
PROJECT_FILES = [
    "stages",
    "tools",
    "dvc.yaml",
    "params.yaml",
    ".gitignore",
    ".dvcignore",
    ".ci",
    *(f"data/{name}.yaml" for name in ("mnist", "fashion-mnist", "kmnist")),
    "data/no-feedback",  # fetch.feedback's default: an empty folder
]


def copy_project(dest):
    """Copies the project's pipeline files into `dest` (created) and returns it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "node_modules")
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def edit_params(path, **overrides):
    """Changes values of the params file at `path` in place, as a user edits it: comments
    and layout kept. Overrides like train__epochs=1 (tools.paths.set_params)."""
    set_params(path, {key.replace("__", "."): value for key, value in overrides.items()})


# The dataset record of MNIST as fetch and prepare write it (data/mnist.yaml).
MNIST_INFO = {"name": "mnist", "classes": [str(d) for d in range(10)], "preparation": "digits"}


def mnist_arrays(directory=None):
    """[train images, train labels, test images, test labels] of the MNIST files."""
    from stages import fetch, prepare

    mnist = fetch.load_description(ROOT / "data" / "mnist.yaml")
    return prepare.read_arrays(
        directory or MNIST_MIRROR, {"train": mnist.train, "test": mnist.test}
    )


def export_onnx(model, path, dataset=None):
    """`model` as an ONNX file at `path` recording `dataset` (default MNIST's), as the
    export stage writes it."""
    from stages.export import fix_onnx

    model.export(str(path), format="onnx", verbose=False)
    fix_onnx(path, dataset or MNIST_INFO)
    return path


def png_bytes(image, format="PNG", **options):
    """A PIL image encoded as `format` (PNG, JPEG, ...), with the encoder's options."""
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG that claims width x height 8-bit grey pixels but holds 100 bytes of data:
    decoding it in full would need width * height bytes, and would find it truncated."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model=None, cwd=ROOT, timeout_s=120, args=()):
    """`python -m tools.serve` on a free port of 127.0.0.1, as a user starts it (the
    server's default model unless `model`; more flags in `args`): (process, URL) once it
    answers /health."""
    port = free_port()
    command = [sys.executable, "-m", "tools.serve", "--port", str(port), *map(str, args)]
    command += ["--model", str(model)] if model is not None else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.TemporaryFile("w+") as log:  # a pipe nobody reads would block the server
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while not answers_health(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"the server did not answer /health:\n{log.read()}")
                time.sleep(0.2)
            yield process, url
        finally:
            process.kill()
            process.wait()


def answers_health(url):
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def make_prepared(out_dir, n_train=96, n_val=32, n_test=64, seed=0):
    """Writes a tiny learnable dataset in prepare's format: digit c is a bright 4x4 patch
    at a position that depends on c, plus noise."""
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.uniform(0, 0.2, size=(n, 28, 28, 1)).astype(np.float32)
        for i, c in enumerate(labels):
            row, col = 2 + 8 * (c // 4), 2 + 6 * (c % 4)
            images[i, row : row + 4, col : col + 4, 0] = 1.0
        np.save(out_dir / f"x_{split}.npy", images)
        np.save(out_dir / f"y_{split}.npy", labels)
    (out_dir / "dataset.json").write_text(json.dumps(MNIST_INFO))
    return out_dir


# Test-only packages that TensorFlow or Keras would import at every start-up if they were
# importable (jax, scikit-learn): `make setup` installs them apart (requirements-extras.in).
EXTRAS = Path(sys.prefix) / "extras"


def extras(*packages):
    """EXTRAS, for sys.path or PYTHONPATH, when it holds `packages`; else the test skips."""
    missing = [p for p in packages if not (EXTRAS / p).is_dir()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not in {EXTRAS} (make setup installs it)")
    return str(EXTRAS)


def run_stage(module, *args, env=None, cwd=None, check=True):
    """Runs `python -m stages.<module> args` as DVC would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", f"stages.{module}", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"stages.{module} failed:\n{result.stdout}\n{result.stderr}")
    return result


def pytest_collection_modifyitems(items):
    """The tests that use the reproduced tiny pipeline first: pytest-xdist hands each worker
    a contiguous share of this list, so one worker builds it at once while the other runs
    tests that do not need it, instead of waiting on its lock (about 30 s)."""
    items.sort(key=lambda item: "reproduced" not in item.fixturenames)


@pytest.fixture(autouse=True)
def fresh_backend_state():
    """train_model sets process-wide state: Keras' dtype policy (mixed_bfloat16 on this
    CPU), the global seeds. Puts each back after every test, so that no test depends on
    which ran before it in its process (`make test` spreads the tests over processes in an
    order that varies). TensorFlow's deterministic ops stay on once a test turned them on
    (no public switch back), so every test that trains in this process keeps params.yaml's
    train.deterministic: true; one that trains without runs the stage apart (run_stage)."""
    yield
    if "keras" in sys.modules:  # never imports Keras for a test that did not
        keras = sys.modules["keras"]
        keras.mixed_precision.set_dtype_policy("float32")
        keras.backend.clear_session()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty directory as the working directory, as DVC runs stages from the root."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- the real pipeline, run with `dvc` as a user runs it --------------------------------

# The pipeline on 500 real MNIST training and 500 test images for the tests that run `dvc`:
# the `fast` preset with its own learning rate, one pass over the images in batches of 64
# (its 512 is one step here; `preset` epochs would pass 15 times to make its 94 steps), so
# that train, evaluate and export take seconds. Accuracies are low and beside the point.
TINY_PIPELINE = {
    "prepare__train_size": 500,
    "prepare__test_size": 500,
    "train__model": "fast",
    "train__epochs": 1,
    "train__batch_size": 64,
    "evaluate__gallery_size": 8,
}


def user_env(extra=None):
    """A user's shell: the interpreter running the tests first on PATH (DVC runs
    `python -m stages.X`), the offline mirror, and no AWS credentials but those given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {
        **env,
        "MNIST_MIRROR": str(MNIST_MIRROR),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        **(extra or {}),
    }


def run(repo, *cmd, env=None):
    """Runs cmd in repo as a user would; returns (exit code, stdout + stderr)."""
    result = subprocess.run(
        [str(c) for c in cmd],
        cwd=repo,
        env=user_env(env),
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def sh(repo, *cmd, env=None):
    """Runs cmd in repo as a user would; returns its output, or fails the test with it."""
    code, output = run(repo, *cmd, env=env)
    if code != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {code}:\n{output}")
    return output


def ran_stages(output):
    """The stages a `dvc repro` or `dvc exp run` ran, in the order it ran them."""
    return [line.split("'")[1] for line in output.splitlines() if "Running stage '" in line]


def shown_experiments(repo):
    """{name: (train params, test accuracy)} of the experiments `dvc exp show` lists."""
    found = {}
    for rev in json.loads(sh(repo, "dvc", "exp", "show", "--json")):
        for exp in rev.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["revs"][0]["name"]] = (
                data["params"]["params.yaml"]["data"]["train"],
                data["metrics"]["data/evaluate/metrics.json"]["data"]["accuracy"],
            )
    return found


def git_identity(repo):
    sh(repo, "git", "config", "user.email", "test@example.com")
    sh(repo, "git", "config", "user.name", "Test")


def commit(repo, message):
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)


def build_reproduced(repo):
    """A git + DVC project on TINY_PIPELINE at `repo`, reproduced and committed as `main`;
    returns the output of its `dvc repro`."""
    copy_project(repo)
    edit_params(repo / "params.yaml", **TINY_PIPELINE)
    sh(repo, "git", "init", "-q", "-b", "main")
    git_identity(repo)
    sh(repo, "dvc", "init", "-q")
    commit(repo, "project")
    output = sh(repo, "dvc", "repro")
    commit(repo, "baseline")
    return output


def build_once(tmp_path_factory, worker_id, name, build):
    """Runs build(directory) -> dict of strings once per test run, whatever the number of
    pytest-xdist workers (its documented file-lock recipe), and returns (directory, dict).
    The directory is shared: tests copy it, never change it."""
    if worker_id == "master":  # plain pytest, one process
        directory = tmp_path_factory.mktemp(name) / "project"
        return directory, build(directory)
    shared = tmp_path_factory.getbasetemp().parent / name  # the same for every worker
    directory, record = shared / "project", shared / "build.json"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / "build.lock")):
        if not record.exists():
            shutil.rmtree(directory, ignore_errors=True)  # from a worker that died building it
            record.write_text(json.dumps(build(directory)))
    return directory, json.loads(record.read_text())


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, worker_id):
    """The TINY_PIPELINE project, reproduced and committed as `main` once per test run:
    (path, output of its `dvc repro`). Tests copy it, never change it."""
    repo, built = build_once(
        tmp_path_factory, worker_id, "reproduced", lambda d: {"output": build_reproduced(d)}
    )
    return repo, built["output"]


def copy_reproduced(reproduced, dest):
    """A copy of the reproduced project at dest: files, git history and DVC cache."""
    shutil.copytree(reproduced[0], dest, symlinks=True)
    return Path(dest)


# --- a team's S3 remote and machines, for the tests that share through it ------------------

BIN = Path(sys.executable).parent
RCLONE = shutil.which("rclone", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
# rclone answers InvalidAccessKeyId to access key IDs shorter than 3 characters.
KEY, SECRET = "mnist-team", "mnist-team-secret"
BUCKET = "mnist"


def start_s3(store, *flags):
    """Starts `rclone serve s3` over the directory `store` (its subdirectories are the
    buckets); returns the process and its endpoint URL once it accepts connections."""
    port = free_port()
    log = (Path(store).parent / f"rclone-{port}.log").open("w")
    auth = ["--auth-key", f"{KEY},{SECRET}"]
    cmd = [RCLONE, "serve", "s3", "--addr", f"127.0.0.1:{port}", *auth, *flags, str(store)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"rclone serve s3 did not start:\n{Path(log.name).read_text()}")


def stop_s3(proc):
    proc.kill()  # SIGKILL: a crash. SIGTERM lets rclone finish the uploads in flight.
    proc.wait()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One S3 server for the module, with an empty bucket; yields (store dir, endpoint)."""
    store = tmp_path_factory.mktemp("s3") / "store"
    (store / BUCKET).mkdir(parents=True)
    proc, endpoint = start_s3(store)
    yield store, endpoint
    stop_s3(proc)


def set_credentials(repo, remote="storage", key=KEY, secret=SECRET):
    """Credentials go to .dvc/config.local, which git never carries."""
    sh(repo, "dvc", "remote", "modify", "--local", remote, "access_key_id", key)
    sh(repo, "dvc", "remote", "modify", "--local", remote, "secret_access_key", secret)


def clone(origin, dest, credentials=True):
    """Another machine: a clone of origin, with the team's credentials unless told not."""
    sh(dest.parent, "git", "clone", "-q", str(origin), str(dest))
    git_identity(dest)
    if credentials:
        set_credentials(dest)
    return dest


@pytest.fixture(scope="module")
def machine_a(tmp_path_factory, reproduced, s3):
    """Machine A: the reproduced tiny project with the team's remote committed, git pushed
    to a bare origin and data to the S3 remote. Returns (A's path, origin's path)."""
    _, endpoint = s3
    base = tmp_path_factory.mktemp("machines")
    origin = base / "origin.git"
    sh(base, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    repo = copy_reproduced(reproduced, base / "a")
    # The team's remote is committed; the credentials are not.
    sh(repo, "dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    sh(repo, "dvc", "remote", "modify", "storage", "endpointurl", endpoint)
    set_credentials(repo)
    commit(repo, "team remote")
    sh(repo, "git", "remote", "add", "origin", str(origin))
    sh(repo, "git", "push", "-q", "origin", "main")
    assert re.search(r"^\d+ files pushed$", sh(repo, "dvc", "push"), re.M)
    return repo, origin
