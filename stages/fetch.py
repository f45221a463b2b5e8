"""Fetch stage: obtains the four MNIST IDX files and verifies each one.

Reads   params.yaml `fetch` (mirrors, timeout_s) and the environment variable
        MNIST_MIRROR (a local directory or a URL), which is tried before the mirrors.
        Neither is a DVC param or dependency: each file is accepted only by its checksum,
        so the output is the same from any mirror.
Writes  OUT/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz, all four or none.

Each file is accepted only if its decompressed bytes have the canonical SHA-256;
otherwise the next mirror is tried. Mirrors recompress, so the .gz bytes are not checked.
"""

import argparse
import gzip
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from pydantic import Field
from tqdm import tqdm

from stages import params
from stages.common import PipelineError, atomic_dir, run_cli


class Params(params.Section):
    section = "fetch"
    # Every file is checked by checksum, so where it came from cannot change the output.
    untracked = ("mirrors", "timeout_s")

    mirrors: tuple[params.Url, ...] = Field(min_length=1, strict=False)  # after $MNIST_MIRROR
    timeout_s: float = Field(gt=0)  # per HTTP request


# SHA-256 of the decompressed files (Yann LeCun's originals).
FILES = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",  # noqa: E501
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",  # noqa: E501
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRROR_ENV = "MNIST_MIRROR"
CHUNK = 1 << 16


class BadFile(Exception):
    """A mirror served a file that fails verification (message says why)."""


def is_url(location):
    return location.startswith(("http://", "https://", "file://"))


def copy_from(location, name, dest, timeout_s):
    """Copies `name` from a mirror (directory or URL) to `dest`, with a progress bar."""
    if not is_url(location):
        shutil.copyfile(Path(location) / name, dest)
        return
    url = location.rstrip("/") + "/" + name
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise BadFile(f"download cut short after {received} of {total} bytes")


def verify(path, expected_sha256):
    """Raises BadFile unless `path` is a complete gzip whose content has the expected hash."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise BadFile(f"not a complete gzip file ({e})") from None
    if digest.hexdigest() != expected_sha256:
        raise BadFile(
            f"sha256 mismatch (got {digest.hexdigest()[:12]}…, want {expected_sha256[:12]}…)"
        )


def describe(error):
    """One short phrase for why a mirror failed."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        return f"unreachable ({error.reason})"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    return str(error) or type(error).__name__


def fetch_file(name, mirrors, dest_dir, timeout_s):
    """Puts a verified `name` into dest_dir from the first mirror that serves a good copy;
    returns that mirror."""
    dest = Path(dest_dir) / name
    failures = []
    for mirror in mirrors:
        try:
            copy_from(mirror, name, dest, timeout_s)
            verify(dest, FILES[name])
            return mirror
        # URLError, HTTPError and timeouts are OSErrors; a malformed reply from the
        # server raises an http.client.HTTPException.
        except (BadFile, OSError, http.client.HTTPException) as e:
            dest.unlink(missing_ok=True)
            failures.append(f"{mirror} ({describe(e)})")
    raise PipelineError(
        f"no mirror served a valid {name}: {'; '.join(failures)}. "
        f"Set {MIRROR_ENV} to a directory or URL holding the four MNIST .gz files"
    )


def mirror_list(configured, env=None):
    """The mirrors to try, in order: $MNIST_MIRROR first when set, then params.yaml's."""
    env = os.environ if env is None else env
    first = [env[MIRROR_ENV]] if env.get(MIRROR_ENV) else []
    return first + list(configured)


def fetch(mirrors, out_dir, timeout_s):
    """Writes the four verified files to out_dir; leaves out_dir untouched on failure.
    Returns {file name: mirror it came from}."""
    with atomic_dir(out_dir) as tmp:
        return {name: fetch_file(name, mirrors, tmp, timeout_s) for name in FILES}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the four .gz files")
    args = parser.parse_args(argv)
    p = params.load(Params)
    sources = fetch(mirror_list(p.mirrors), args.out, p.timeout_s)
    for name, mirror in sources.items():
        print(f"fetch: {name} verified, from {mirror}")
    print(f"fetch: wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
