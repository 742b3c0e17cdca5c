"""Tests for jax_impl.download and the downloading paths of load_dataset, against local HTTP mirrors."""

import contextlib
import http.client
import http.server
import json
import os
import pathlib
import re
import socket
import threading
import time

import numpy as np
import pytest

from jax_impl import data, download
from jax_impl.errors import HessianApproxError

GZ = list(download.GZ_SUMS["mnist"])
ENV_VARS = (download.DATA_ENV_VAR, *download.MIRRORS_ENV.values(), "XDG_CACHE_HOME")


def _mnist_source() -> pathlib.Path:
    """The real MNIST .gz files: $HESSIAN_APPROX_DATA, else ../shared/data/mnist beside the repo."""
    env = os.environ.get("HESSIAN_APPROX_DATA")  # read at import, before the tests clear it
    repo = pathlib.Path(__file__).resolve().parents[2]
    return pathlib.Path(env) if env else repo.parent / "shared" / "data" / "mnist"


MNIST_SOURCE = _mnist_source()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No variable of the user's leaks in; the user's cache is a fresh temporary folder."""
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "hessian-approx"


@pytest.fixture(scope="module")
def mnist_gz():
    """name -> bytes of the four published MNIST gzip files."""
    if not all((MNIST_SOURCE / f).is_file() for f in GZ):
        pytest.skip(f"MNIST .gz files not found in {MNIST_SOURCE} (set HESSIAN_APPROX_DATA to their folder)")
    return {f: (MNIST_SOURCE / f).read_bytes() for f in GZ}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes`` (URL path -> bytes); anything else is a 404."""

    def do_GET(self):  # noqa: N802  (http.server's name)
        self.server.hits.append(self.path)
        body = self.server.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve({path: bytes}) -> (server, "http://127.0.0.1:PORT"): a mirror on a free local port."""
    servers = []

    def start(routes):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.routes, srv.hits = routes, []
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def silent_server():
    """A base URL whose server accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(sock.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    stop.set()
    t.join()
    for c in held:
        c.close()
    sock.close()


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}/"


def _leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


# ----------------------------------------------------------------------------------- MNIST

def test_download_verifies_caches_and_loads(serve, mnist_gz, monkeypatch, isolated):
    srv, url = serve({f"/mnist/{f}": b for f, b in mnist_gz.items()})
    monkeypatch.setenv("HESSIAN_APPROX_MNIST_MIRRORS", f"{url}/mnist")
    t0 = time.monotonic()
    ds = data.load_dataset("mnist")
    print(f"download and load: {time.monotonic() - t0:.2f} s")
    assert ds.name == "mnist" and ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,) and ds.x_train.dtype == np.float32
    assert list(ds.y_train[:5]) == [5, 0, 4, 1, 9]
    cache = isolated / "mnist"
    assert ds.source == f"idx:{cache}" and f"downloaded from {url}/mnist/" in ds.note
    assert _leftovers(cache) == sorted(GZ + [download.SOURCES_FILE])
    assert json.loads((cache / download.SOURCES_FILE).read_text()) == {f: f"{url}/mnist/{f}" for f in GZ}
    assert download.is_complete("mnist", cache)
    # Cached: neither "mnist" nor "auto" asks the network again.
    hits = len(srv.hits)
    monkeypatch.setenv("HESSIAN_APPROX_MNIST_MIRRORS", _closed_port_url())
    for name in ("mnist", "auto"):
        again = data.load_dataset(name)
        assert again.name == "mnist" and again.source == ds.source
        np.testing.assert_array_equal(again.x_test, ds.x_test)
    assert len(srv.hits) == hits == 4


def test_corrupt_download_is_rejected_and_removed(serve, mnist_gz, isolated):
    routes = {f"/m/{f}": b for f, b in mnist_gz.items()}
    bad = bytearray(mnist_gz[GZ[0]])
    bad[len(bad) // 2] ^= 0xFF  # same size: only the checksum can tell
    routes[f"/m/{GZ[0]}"] = bytes(bad)
    _, url = serve(routes)
    cache = isolated / "mnist"
    with pytest.raises(HessianApproxError, match=rf"{GZ[0]}.*published checksum \(corrupt") as e:
        data.load_downloaded("mnist", mirrors=f"{url}/m/", timeout=5)
    assert "\n" not in str(e.value) and "--dataset digits" in e.value.fix and "--data-dir" in e.value.fix
    assert _leftovers(cache) == []  # no corrupt file, no temporary file


def test_corrupt_later_file_keeps_only_verified_ones(serve, mnist_gz, isolated, tmp_path):
    routes = {f"/m/{f}": b for f, b in mnist_gz.items()}
    routes[f"/m/{GZ[1]}"] = mnist_gz[GZ[1]] + b"extra"  # longer than published
    _, url = serve(routes)
    folder = tmp_path / "given"
    with pytest.raises(HessianApproxError, match=rf"{GZ[1]}.*longer than the published"):
        download.fetch("mnist", folder, mirrors=[f"{url}/m/"], timeout=5)
    assert _leftovers(folder) == sorted([GZ[0], download.SOURCES_FILE])
    assert download.file_ok("mnist", str(folder / GZ[0]))


def test_silent_server_fails_within_the_timeout(silent_server, isolated):
    timeout = 1.0
    t0 = time.monotonic()
    with pytest.raises(HessianApproxError, match=r"no answer within 1 s") as e:
        data.load_downloaded("mnist", mirrors=silent_server, timeout=timeout)
    elapsed = time.monotonic() - t0
    print(f"silent server: failed after {elapsed:.2f} s (timeout {timeout} s)")
    assert timeout * 0.9 <= elapsed < 3 * timeout
    assert "\n" not in str(e.value) and _leftovers(isolated / "mnist") == []


def test_first_mirror_404_second_works(serve, mnist_gz, isolated):
    first, url1 = serve({})  # every file a 404
    second, url2 = serve({f"/x/{f}": b for f, b in mnist_gz.items()})
    ds = data.load_downloaded("mnist", mirrors=[url1, f"{url2}/x"], timeout=5)
    assert ds.x_train.shape == (60000, 784)
    assert first.hits == [f"/{f}" for f in GZ]  # a 404 is per file: the mirror is asked for each
    assert len(second.hits) == 4 and f"downloaded from {url2}/x/" in ds.note and url1 not in ds.note


def test_dead_mirror_is_skipped_after_first_failure(serve, mnist_gz, isolated):
    srv, url = serve({f"/{f}": b for f, b in mnist_gz.items()})
    dead = _closed_port_url()
    got = download.fetch("mnist", mirrors=f"{dead},{url}", timeout=5)
    assert got == {f: f"{url}/{f}" for f in GZ} and len(srv.hits) == 4


def test_interrupted_download_leaves_nothing(serve, mnist_gz, monkeypatch, isolated):
    _, url = serve({f"/{f}": b for f, b in mnist_gz.items()})
    read, calls = http.client.HTTPResponse.read, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return read(self, *args)

    monkeypatch.setattr(http.client.HTTPResponse, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download.fetch("mnist", mirrors=url, timeout=5)
    assert _leftovers(isolated / "mnist") == []


def test_offline_mnist_is_one_line_error(monkeypatch, isolated):
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    t0 = time.monotonic()
    with pytest.raises(HessianApproxError) as e:
        data.load_dataset("mnist")
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and "cannot download MNIST file" in msg and "offline?" in msg
    for base in download.MIRRORS["mnist"]:  # every published mirror was tried, in order
        assert base.split("/")[2] in msg
    assert msg.index("storage.googleapis.com") < msg.index("ossci-datasets") < msg.index("yann.lecun.com")
    assert "pass --data-dir with the four MNIST IDX files, or use --dataset digits" in msg
    assert _leftovers(isolated / "mnist") == [] and not (isolated / "mnist").exists()
    # auto: the same failure, quickly, becomes digits with the reason in its note.
    ds = data.load_dataset("auto")
    assert ds.name == "digits" and "cannot download MNIST file" in ds.note and "offline?" in ds.note


def test_auto_downloads_with_short_timeout(serve, mnist_gz, monkeypatch, isolated):
    timeouts = []
    fetch = download.fetch
    monkeypatch.setattr(download, "fetch", lambda *a, **k: timeouts.append(k["timeout"]) or fetch(*a, **k))
    monkeypatch.setattr(data, "load_mnist_tfds", lambda **k: (_ for _ in ()).throw(
        HessianApproxError("tensorflow-datasets has no prepared MNIST copy", "")))
    _, url = serve({f"/{f}": b for f, b in mnist_gz.items()})
    monkeypatch.setenv("HESSIAN_APPROX_MNIST_MIRRORS", url)
    ds = data.load_dataset("auto")
    assert ds.name == "mnist" and timeouts == [download.AUTO_TIMEOUT] and download.AUTO_TIMEOUT <= 5


def test_data_env_folder_is_the_download_target(serve, mnist_gz, monkeypatch, tmp_path):
    _, url = serve({f"/{f}": b for f, b in mnist_gz.items()})
    target = tmp_path / "mine" / "mnist"
    monkeypatch.setenv("HESSIAN_APPROX_DATA", str(target))
    monkeypatch.setenv("HESSIAN_APPROX_MNIST_MIRRORS", url)
    assert download.cache_dir("mnist") == str(target)
    assert data.load_dataset("mnist").source == f"idx:{target}"
    assert _leftovers(target) == sorted(GZ + [download.SOURCES_FILE])
    # A folder holding the files is read as it is, errors raised (never re-downloaded over).
    (target / GZ[2]).write_bytes(b"not gzip")
    with pytest.raises(HessianApproxError, match=f"{GZ[2]}.*checksum"):
        data.load_dataset("auto")


# --------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_plumbing_with_stand_in_files(serve, mnist_gz, monkeypatch, isolated):
    """No Fashion-MNIST files here: MNIST's stand in, with the checksum table patched to theirs.

    This proves the plumbing (mirrors variable, cache folder, name, normalization, note), not
    the Fashion-MNIST checksums themselves."""
    _, url = serve({f"/fashion/{f}": b for f, b in mnist_gz.items()})
    monkeypatch.setenv("HESSIAN_APPROX_FASHION_MNIST_MIRRORS", f"{url}/fashion/")
    monkeypatch.setenv("HESSIAN_APPROX_DATA", str(MNIST_SOURCE))  # MNIST's folder: not Fashion-MNIST's
    # With the real table the stand-ins are refused (sizes and sums differ) and nothing stays.
    with pytest.raises(HessianApproxError, match="cannot download Fashion-MNIST file train-images.*bytes"):
        data.load_dataset("fashion-mnist")
    assert _leftovers(isolated / "fashion-mnist") == []
    monkeypatch.setitem(download.GZ_SUMS, "fashion-mnist", download.GZ_SUMS["mnist"])
    ds = data.load_dataset("fashion-mnist")
    assert ds.name == "fashion-mnist" and ds.source == f"idx:{isolated / 'fashion-mnist'}"
    assert ds.x_train.shape == (60000, 784) and ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
    assert ds.note.startswith("Fashion-MNIST (60000 train / 10000 test)") and f"{url}/fashion/" in ds.note
    assert ds.normalization == data.FASHION_MNIST_NORMALIZATION
    raw0 = (ds.x_train[0].astype(np.float64) * 0.3530 + 0.2860) * 255
    np.testing.assert_allclose(raw0, np.round(raw0), atol=2e-3)  # (x/255 - 0.2860)/0.3530 of uint8 pixels
    assert ds.provenance()["dataset"] == "fashion-mnist"
    # An explicit folder is read with the (patched) Fashion table too.
    assert data.load_dataset("fashion-mnist", data_dir=isolated / "fashion-mnist").name == "fashion-mnist"


def test_fashion_mnist_raw_files_have_no_published_checksum(tmp_path, mnist_gz):
    import gzip

    for f, b in mnist_gz.items():
        (tmp_path / f.removesuffix(".gz")).write_bytes(gzip.decompress(b) if "labels" in f else b"")
    with pytest.raises(HessianApproxError, match="uncompressed, and only the gzip files have published"):
        data.load_dataset("fashion-mnist", data_dir=tmp_path)


# ---------------------------------------------------------------------------------- tables

def test_checksum_tables_are_well_formed_and_match_the_shared_copy():
    for name, table in download.GZ_SUMS.items():
        assert sorted(table) == sorted(GZ), name
        for md5, sha, size in table.values():
            assert re.fullmatch("[0-9a-f]{32}", md5) and re.fullmatch("[0-9a-f]{64}", sha) and size > 0
    # Fashion-MNIST: torchvision's MD5s and tensorflow-datasets'/Keras's SHA-256 (spot checks).
    fm = download.GZ_SUMS["fashion-mnist"]
    assert fm["train-images-idx3-ubyte.gz"][0] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert fm["t10k-labels-idx1-ubyte.gz"][1].startswith("67da17c7")
    sums = MNIST_SOURCE / "SHA256SUMS"
    if sums.is_file():  # the shared copy's own list agrees with the MNIST table
        listed = {f.lstrip("*"): sha for sha, f in (ln.split() for ln in sums.read_text().splitlines() if ln.strip())}
        assert listed == {f: sha for f, (_, sha, _) in download.GZ_SUMS["mnist"].items()}


def test_mirror_lists_and_overrides(monkeypatch):
    assert download.mirror_urls("mnist")[0] == "https://storage.googleapis.com/cvdf-datasets/mnist/"
    assert download.mirror_urls("mnist")[1:] == ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                                                 "http://yann.lecun.com/exdb/mnist/")
    assert download.mirror_urls("fashion-mnist")[0] == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    monkeypatch.setenv("HESSIAN_APPROX_MNIST_MIRRORS", " http://a/x , https://b/ ,")
    assert download.mirror_urls("mnist") == ("http://a/x/", "https://b/")
    assert download.mirror_urls("mnist", ["http://c"]) == ("http://c/",)  # the argument wins
    with pytest.raises(HessianApproxError, match="HESSIAN_APPROX_MNIST_MIRRORS holds 'ftp://z/'"):
        monkeypatch.setenv("HESSIAN_APPROX_MNIST_MIRRORS", "ftp://z")
        download.mirror_urls("mnist")
    with pytest.raises(HessianApproxError, match="no download is known"):
        download.fetch("cifar10")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert download.cache_dir("fashion-mnist") == str(tmp_path / "hessian-approx" / "fashion-mnist")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.cache_dir("mnist") == str(tmp_path / "home" / ".cache" / "hessian-approx" / "mnist")
    monkeypatch.setenv("HESSIAN_APPROX_DATA", str(tmp_path / "d"))
    assert download.cache_dir("mnist") == str(tmp_path / "d")
    assert download.cache_dir("fashion-mnist").endswith(os.path.join(".cache", "hessian-approx", "fashion-mnist"))


# ------------------------------------------------------------------------------------- CLI

def test_cli_train_downloads_mnist(serve, mnist_gz, monkeypatch, isolated, tmp_path, capsys):
    from benchmarks.cli import main

    _, url = serve({f"/{f}": b for f, b in mnist_gz.items()})
    monkeypatch.setenv("HESSIAN_APPROX_MNIST_MIRRORS", url)
    out = tmp_path / "w.safetensors"
    t0 = time.monotonic()
    code = main(["train", "--dataset", "mnist", "--hidden", "4", "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    print(f"cli train on downloaded MNIST: {time.monotonic() - t0:.1f} s")
    assert code == 0, err
    assert out.is_file() and download.is_complete("mnist", isolated / "mnist")
    assert f"data: MNIST (60000 train / 10000 test) from checksum-verified IDX files in {isolated / 'mnist'}, " \
           f"downloaded from {url}/." in err
    # Offline with an empty cache: exit status 2 and one line naming the problem and the fix.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HESSIAN_APPROX_MNIST_MIRRORS", _closed_port_url())
    code = main(["train", "--dataset", "mnist", "--hidden", "4", "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "connection refused" in lines[0] and "--dataset digits" in lines[0]


def test_hanging_name_lookup_is_bounded_by_the_timeout(monkeypatch, isolated):
    """urllib's timeout does not cover getaddrinfo; a resolver that hangs must not hang the download."""
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(30))
    t0 = time.monotonic()
    with pytest.raises(HessianApproxError) as e:
        download.fetch("mnist", mirrors="http://example.invalid/a/", timeout=0.5)
    assert time.monotonic() - t0 < 3  # one lookup, then the mirror is skipped as unreachable
    assert "host name lookup took longer than 0.5 s" in str(e.value)
    assert _leftovers(isolated / "mnist") == []
