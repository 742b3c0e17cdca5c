"""Downloads of the MNIST and Fashion-MNIST IDX files from public mirrors into a checksum-verified cache."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from hessian_approx.fileio import atomic_write
from jax_impl.errors import HessianApproxError

TIMEOUT = 30.0  # seconds per connection attempt and per read (--dataset mnist / fashion-mnist)
AUTO_TIMEOUT = 5.0  # the same for --dataset auto, which falls back to digits instead of waiting
SOURCES_FILE = "SOURCES.json"  # in a download folder: file name -> the URL it came from

# Published checksums of the gzip files: name -> (MD5, SHA-256, bytes).
# MNIST: MD5 as in torchvision's MNIST.resources and the MNIST distribution; SHA-256 and sizes
# as in tensorflow-datasets' url_checksums/mnist.txt.
# Fashion-MNIST: MD5 from torchvision (torchvision/datasets/mnist.py, FashionMNIST.resources);
# SHA-256 and sizes from tensorflow-datasets 4.9.10 (url_checksums/fashion_mnist.txt; Keras's
# keras/src/datasets/fashion_mnist.py FILE_HASHES lists the same SHA-256 sums).
GZ_SUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                       "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
        "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432",
                                       "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
        "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3",
                                      "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
        "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c",
                                      "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                       "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880),
        "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe",
                                       "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515),
        "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79",
                                      "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102),
        "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310",
                                      "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148),
    },
}
# SHA-256 of the decompressed MNIST files (no such sums are published for Fashion-MNIST). Derived
# once by decompressing the gzip files above after verifying them against both published
# checksums (`gunzip -c F.gz | sha256sum`).
RAW_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {},
}
LABELS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
# Base URLs, tried in order: the mirrors tensorflow-datasets and torchvision download from.
MIRRORS = {
    "mnist": (
        "https://storage.googleapis.com/cvdf-datasets/mnist/",  # tensorflow-datasets
        "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision
        "http://yann.lecun.com/exdb/mnist/",  # the original distribution (torchvision's first)
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # torchvision and tensorflow-datasets
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",  # Keras (same files, same SHA-256)
    ),
}
MIRRORS_ENV = {"mnist": "HESSIAN_APPROX_MNIST_MIRRORS", "fashion-mnist": "HESSIAN_APPROX_FASHION_MNIST_MIRRORS"}
DATA_ENV_VAR = "HESSIAN_APPROX_DATA"


class _Failed(Exception):
    """One mirror failed for one file (not an OSError, so atomic_write passes it through)."""

    def __init__(self, reason: str, dead: bool = False):
        super().__init__(reason)
        self.dead = dead  # unreachable: skip this mirror for the remaining files


def _check_name(name: str) -> None:
    if name not in GZ_SUMS:
        raise HessianApproxError(f"no download is known for dataset {name!r}", f"use one of: {', '.join(GZ_SUMS)}")


def cache_dir(name: str) -> str:
    """Where ``name``'s files are downloaded by default.

    MNIST: $HESSIAN_APPROX_DATA if set (the MNIST folder), else the user's cache
    ($XDG_CACHE_HOME/hessian-approx/mnist or ~/.cache/hessian-approx/mnist). Fashion-MNIST
    (whose files have MNIST's names) always the user's cache: .../hessian-approx/fashion-mnist.
    """
    _check_name(name)
    if name == "mnist" and os.environ.get(DATA_ENV_VAR):
        return os.path.abspath(os.path.expanduser(os.environ[DATA_ENV_VAR]))
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: relative values are ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hessian-approx", name)


def mirror_urls(name: str, override=None) -> tuple[str, ...]:
    """Base URLs to try in order: ``override`` (a list or comma-separated string), else the
    dataset's environment variable (HESSIAN_APPROX_MNIST_MIRRORS, ...), else MIRRORS[name]."""
    _check_name(name)
    where = "the mirrors argument"
    if override is None:
        override, where = os.environ.get(MIRRORS_ENV[name]) or None, MIRRORS_ENV[name]
    if override is None:
        return MIRRORS[name]
    items = override.split(",") if isinstance(override, str) else list(override)
    bases = tuple(b if b.endswith("/") else b + "/" for b in (str(i).strip() for i in items) if b)
    bad = [b for b in bases if urllib.parse.urlsplit(b).scheme not in ("http", "https")]
    if not bases or bad:
        raise HessianApproxError(f"{where} holds {bad[0] if bad else 'no URL'!r}, not http(s) base URLs",
                                 "give comma-separated base URLs such as https://host/mnist/")
    return bases


def file_ok(name: str, path: str) -> bool:
    """Whether ``path`` (a ``.gz`` file named as published) matches its published checksums."""
    md5, sha, size = GZ_SUMS[name][os.path.basename(path)]
    try:
        if os.path.getsize(path) != size:
            return False
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return hashlib.md5(data).hexdigest() == md5 and hashlib.sha256(data).hexdigest() == sha


def is_complete(name: str, folder: str) -> bool:
    """Whether ``folder`` holds all of ``name``'s gzip files, each checksum-verified (no network)."""
    _check_name(name)
    return all(file_ok(name, os.path.join(folder, f)) for f in GZ_SUMS[name])


def sources(folder: str) -> dict:
    """file name -> URL for the files downloaded into ``folder`` (empty if none are recorded)."""
    try:
        with open(os.path.join(folder, SOURCES_FILE), encoding="utf-8") as f:
            got = json.load(f)
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in got.items()} if isinstance(got, dict) else {}


def fetch(name: str, folder=None, mirrors=None, timeout: float = TIMEOUT, progress=None) -> dict:
    """Download ``name``'s four gzip files that ``folder`` lacks (or holds corrupt) and verify them.

    folder: default ``cache_dir(name)``; mirrors: see ``mirror_urls``; timeout: seconds for each
    connection attempt and each read; progress: a status line on stderr (default: if a terminal).
    Each file goes to a temporary file, is checked against its published size, MD5 and SHA-256,
    and only then renamed into place; a failed or interrupted download leaves nothing behind.
    Mirrors are tried in order. Returns file name -> URL for the files downloaded now.
    Raises HessianApproxError (one line) when a file cannot be had from any mirror.
    """
    _check_name(name)
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder if folder is not None else cache_dir(name))))
    bases = list(mirror_urls(name, mirrors))
    show = sys.stderr.isatty() if progress is None else bool(progress)
    todo = [f for f in GZ_SUMS[name] if not file_ok(name, os.path.join(folder, f))]
    existed = os.path.isdir(folder)
    got, dead = {}, set()
    for fname in todo:
        failures = []
        for base in [b for b in bases if b not in dead] or bases:
            url = base + fname
            try:
                atomic_write(os.path.join(folder, fname),
                             lambda tmp, u=url: _download_to(u, tmp, GZ_SUMS[name][fname], timeout, show))
            except _Failed as e:
                failures.append(f"{urllib.parse.urlsplit(url).netloc}: {e}")
                if e.dead:
                    dead.add(base)
                continue
            got[fname] = url
            break
        else:
            _record(folder, got)
            if not existed:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only if empty: a folder this call made and filled with nothing
            label = LABELS[name]
            raise HessianApproxError(
                f"cannot download {label} file {fname} into {folder} ({'; '.join(failures)})",
                f"check the network connection (or set {MIRRORS_ENV[name]} to reachable mirrors), "
                f"pass --data-dir with the four {label} IDX files, or use --dataset digits")
    _record(folder, got)
    return got


def _record(folder: str, got: dict) -> None:
    """Add ``got`` (file name -> URL) to the folder's SOURCES.json (best effort: provenance only)."""
    if not got:
        return
    merged = {**sources(folder), **got}
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(merged, indent=1, sort_keys=True) + "\n")

    try:
        atomic_write(os.path.join(folder, SOURCES_FILE), write)
    except HessianApproxError:
        pass


def _reason(err: BaseException, timeout: float) -> _Failed:
    """A short one-line reason for a network error, and whether the mirror is unreachable."""
    if isinstance(err, urllib.error.HTTPError):
        return _Failed(f"HTTP {err.code} {err.reason}")
    cause = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(cause, socket.gaierror):
        return _Failed("host name lookup failed (offline?)", dead=True)
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return _Failed(f"no answer within {timeout:g} s", dead=True)
    if isinstance(cause, ConnectionRefusedError):
        return _Failed("connection refused", dead=True)
    text = str(cause).strip().splitlines()
    return _Failed(f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": "), dead=isinstance(cause, OSError))


def _lookup_within(host: str, timeout: float) -> None:
    """Resolve ``host`` in a daemon thread: urllib's timeout does not cover the name lookup,
    which can hang for minutes on a machine with a broken resolver."""
    import threading

    box: dict = {}
    done = threading.Event()

    def lookup():
        try:
            socket.getaddrinfo(host, None)
        except OSError as err:
            box["err"] = err
        done.set()

    threading.Thread(target=lookup, daemon=True, name="hessian-approx-dns").start()
    if not done.wait(timeout):
        raise _Failed(f"host name lookup took longer than {timeout:g} s", dead=True)
    if "err" in box:
        raise _reason(box["err"], timeout)


def _download_to(url: str, tmp: str, expected: tuple, timeout: float, show: bool) -> None:
    """Stream ``url`` into ``tmp``, hashing as it goes; _Failed on any network or checksum problem."""
    md5_hex, sha_hex, size = expected
    md5, sha, done = hashlib.md5(), hashlib.sha256(), 0
    name, host = url.rsplit("/", 1)[-1], urllib.parse.urlsplit(url).netloc
    req = urllib.request.Request(url, headers={"User-Agent": "hessian-approx (urllib)"})
    _lookup_within(urllib.parse.urlsplit(url).hostname or "", timeout)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310  (http(s) only, checked in mirror_urls)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _reason(e, timeout) from None
    last = 0.0
    try:
        with resp, open(tmp, "wb") as out:
            while True:
                try:
                    chunk = resp.read(1 << 16)
                except (OSError, http.client.HTTPException) as e:
                    raise _reason(e, timeout) from None
                if not chunk:
                    break
                done += len(chunk)
                if done > size:
                    raise _Failed(f"longer than the published {size} bytes (not the published file)")
                md5.update(chunk)
                sha.update(chunk)
                out.write(chunk)  # an OSError here (disk full) is atomic_write's to report
                if show and (time.monotonic() - last > 0.2 or done == size):
                    last = time.monotonic()
                    print(f"\rdownloading {name} from {host}: {done / 1e6:.1f}/{size / 1e6:.1f} MB",
                          end="", file=sys.stderr, flush=True)
    finally:
        if show and last:
            print(file=sys.stderr, flush=True)
    if done != size:
        raise _Failed(f"got {done} bytes, the published file has {size}")
    if md5.hexdigest() != md5_hex or sha.hexdigest() != sha_hex:
        raise _Failed("does not match the published checksum (corrupt or altered)")
