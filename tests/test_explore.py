"""``vaelab explore``: the request handling (good requests answer what the model computes;
bad ones are refused before the model or the filesystem sees them), every likelihood and
model kind, the command (Ctrl-C exits 0), and the page in a real headless Chromium."""

from __future__ import annotations

import builtins
import http.client
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides, train
from vaelab import config, likelihoods, models, objectives
from vaelab.cli import main
from vaelab.data import ImageSet
from vaelab.explore import (
    MAX_BODY,
    Z_LIMIT,
    Explorer,
    handle_request,
    load_page,
    make_server,
)

N_POINTS = 300


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_available):
    """A real run: 1 epoch on 512 Fashion-MNIST images (static binarisation, L = 4)."""
    directory = tmp_path_factory.mktemp("explore_run")
    train(config.resolve(overrides=tiny_overrides(**{"train.epochs": 1})), directory,
          report=False)
    return directory


@pytest.fixture(scope="module")
def explorer(run_dir):
    return Explorer.open(run_dir, "best", points=N_POINTS)


def ask(explorer, method, target, body=b"", **kwargs):
    return handle_request(explorer, load_page(), method, target, body, **kwargs)


def decoder_mean(model, z) -> np.ndarray:
    """``model.decode(z).mean`` in [0, 1] as ``(H, W, C)`` float64: what the page must show."""
    with torch.no_grad():
        mean = model.decode(torch.tensor([z], dtype=torch.float32)).mean[0]
    return mean.clamp(0, 1).permute(1, 2, 0).double().numpy()


def pixels(image: dict) -> np.ndarray:
    return np.asarray(image["pixels"], dtype=np.float64).reshape(
        image["height"], image["width"], image["channels"])


def assert_shows(image: dict, expected: np.ndarray) -> None:
    """The 8-bit image is the float image rounded: within half a level (and so 1/255)."""
    assert pixels(image).shape == expected.shape
    assert np.abs(pixels(image) - 255 * expected).max() <= 0.5 + 1e-3


# --------------------------------------------------------------------------- good requests


def test_decode_is_the_models_decoder_mean(explorer):
    gen = torch.Generator().manual_seed(3)
    cases = [torch.randn(4, generator=gen).tolist() for _ in range(3)]
    cases += [[0.0] * 4, [Z_LIMIT, -Z_LIMIT, 0.5, 0]]  # the limits themselves are allowed
    for z in cases:
        response = ask(explorer, "POST", "/api/decode", json.dumps({"z": z}).encode())
        assert response.status == 200, response.body
        answer = response.json()
        assert answer["z"] == pytest.approx(z, abs=1e-6)
        assert (answer["image"]["height"], answer["image"]["width"]) == (28, 28)
        assert_shows(answer["image"], decoder_mean(explorer.model, z))
    # and different z give different images (the test above could not pass by a constant)
    first, second = (pixels(ask(explorer, "POST", "/api/decode", json.dumps({"z": z}).encode()
                                ).json()["image"]) for z in ([-2, 0, 0, 0], [2, 0, 0, 0]))
    assert np.abs(first - second).max() > 20


def test_meta_is_the_plane_of_latent_scatter(explorer):
    meta = ask(explorer, "GET", "/api/meta?x=1").json()  # a query string is ignored
    assert meta["n_points"] == N_POINTS and meta["n_test"] == 10000
    assert meta["latent_dim"] == 4 and meta["event_shape"] == [1, 28, 28]
    assert meta["info"]["likelihood"] == "bernoulli" and meta["nll_samples"] == 1000
    assert meta["scatter"]["labels"] == explorer.test.labels[:N_POINTS].tolist()
    assert meta["scatter"]["classes"][0] == "T-shirt/top"
    # L = 4 > 2: the first two principal axes of the encoder means, checked with numpy
    model, test = explorer.model, explorer.test
    with torch.no_grad():
        loc = model.encode(test.images[:N_POINTS].float()).mean.double().numpy()
    centred = loc - loc.mean(0)
    values, vectors = np.linalg.eigh(np.cov(centred.T))
    vectors = vectors[:, ::-1].T
    vectors *= np.sign(vectors[np.arange(4), np.abs(vectors).argmax(1)])[:, None]
    expected = centred @ vectors[:2].T
    plane = meta["plane"]
    assert plane["kind"] == "pca" and plane["names"][0].startswith("PC 1 (")
    np.testing.assert_allclose(np.stack([meta["scatter"]["x"], meta["scatter"]["y"]], 1),
                               expected, atol=2e-5)
    np.testing.assert_allclose(plane["explained"], values[::-1] / values.sum(), rtol=1e-6)
    # the page's z = c + u B gives back each point's encoder mean
    point = ask(explorer, "GET", "/api/point/11").json()
    z = np.asarray(plane["centre"]) + np.asarray(point["u"]) @ np.asarray(plane["basis"])
    np.testing.assert_allclose(z, loc[11], atol=1e-6)
    np.testing.assert_allclose(point["z"], loc[11], atol=1e-6)
    for (lo, hi), column in zip(plane["ranges"], (centred @ vectors.T).T):
        assert lo < column.min() and column.max() < hi


def test_a_test_point_has_its_images_and_honest_numbers(explorer):
    index = 7
    answer = ask(explorer, "GET", f"/api/point/{index}").json()
    test, model = explorer.test, explorer.model
    x = test.images[index:index + 1].float()  # static binarisation: 0/1 images
    assert answer["label"] == int(test.labels[index])
    np.testing.assert_array_equal(pixels(answer["input"])[..., 0], 255 * x[0, 0].numpy())
    np.testing.assert_array_equal(pixels(answer["original"])[..., 0], test.grey[index, 0].numpy())
    with torch.no_grad():
        loc = model.encode(x).mean[0]
    assert answer["z"] == pytest.approx(loc.tolist(), abs=1e-6)
    assert_shows(answer["reconstruction"], decoder_mean(model, loc.tolist()))
    # NELBO: the mean of 100 one-sample ELBOs, within 4 of its standard errors of a
    # 20000-draw estimate
    nelbo = answer["nelbo"]
    assert nelbo["samples"] == 100 and nelbo["stderr"] > 0
    assert nelbo["value"] == pytest.approx(nelbo["recon"] + nelbo["kl"], abs=1e-3)
    with torch.no_grad():
        reference = -objectives.elbo_terms(model, x, num_samples=20000,
                                           generator=torch.Generator().manual_seed(1)).elbo
    assert abs(nelbo["value"] - float(reference)) < 4 * nelbo["stderr"]
    # NLL: importance sampling with K = 1000; below the NELBO, and near a K = 20000 estimate
    nll = answer["nll"]
    assert nll["samples"] == 1000 and "importance sampling" in nll["estimator"]
    assert nll["value"] < nelbo["value"] + 3 * nelbo["stderr"]
    long = objectives.log_likelihood(model, x, 20000, generator=torch.Generator().manual_seed(2))
    assert abs(nll["value"] + float(long.per_example[0])) < 4 * nll["mc_stderr"] + 0.2
    assert nll["pareto_k"] is None or math.isfinite(nll["pareto_k"])
    # seeded: asking again gives the same numbers
    assert ask(explorer, "GET", f"/api/point/{index}").json() == answer


def test_the_page_is_served_from_memory(explorer):
    response = ask(explorer, "GET", "/")
    assert response.status == 200 and response.content_type.startswith("text/html")
    assert response.body == load_page() and b'id="plane"' in response.body
    assert b"http://" not in response.body and b"https://" not in response.body  # no CDN
    assert ask(explorer, "GET", "/index.html").body == response.body


# --------------------------------------------------------------------------- bad requests

_Z = b'{"z": [%s, 0, 0, 0]}'

BAD = [
    ("GET", "/../etc/passwd", b"", 400, "'..'"),
    ("GET", "/%2e%2e/%2E%2E/etc/passwd", b"", 400, "'..'"),
    ("GET", "/api/point/..%2f..%2fsecret", b"", 400, "'..'"),
    ("GET", "/static/..", b"", 400, "'..'"),
    ("GET", "/%5c..%5cwin.ini", b"", 400, "'..'"),
    ("GET", "/page.html", b"", 404, "no such page"),
    ("GET", "/etc/passwd", b"", 404, "no such page"),
    ("GET", "/api", b"", 404, "no such page"),
    ("GET", "/api/decode", b"", 405, "use POST"),
    ("POST", "/api/meta", b"", 405, "use GET"),
    ("DELETE", "/", b"", 405, "use GET"),
    ("GET", "/api/point/abc", b"", 400, "a test point is a number"),
    ("GET", "/api/point/-1", b"", 400, "a test point is a number"),
    ("GET", "/api/point/1e2", b"", 400, "a test point is a number"),
    ("GET", "/api/point/", b"", 400, "a test point is a number"),
    ("GET", "/api/point/%D9%A3", b"", 400, "a test point is a number"),  # Arabic-Indic 3
    ("GET", "/api/point/99999999999999999999", b"", 400, "a test point is a number"),
    ("GET", f"/api/point/{N_POINTS}", b"", 404, "no test point"),
    ("POST", "/api/decode", b"", 400, "not JSON"),
    ("POST", "/api/decode", b"{", 400, "not JSON"),
    ("POST", "/api/decode", b"\xff\xfe", 400, "not JSON"),
    ("POST", "/api/decode", b"[" * 50000, 400, "not JSON"),
    ("POST", "/api/decode", b"[" * (MAX_BODY + 1), 400, "over"),
    ("POST", "/api/decode", _Z % (b"1" * 5000), 400, "not JSON"),
    ("POST", "/api/decode", b"[0, 0, 0, 0]", 400, "JSON object"),
    ("POST", "/api/decode", b'{"x": [0, 0, 0, 0]}', 400, "JSON object"),
    ("POST", "/api/decode", b'{"z": {"0": 1}}', 400, "list of 4"),
    ("POST", "/api/decode", b'{"z": [0, 0, 0]}', 400, "4 values"),
    ("POST", "/api/decode", b'{"z": [0, 0, 0, 0, 0]}', 400, "4 values"),
    ("POST", "/api/decode", _Z % b"NaN", 400, "not a finite number"),
    ("POST", "/api/decode", _Z % b"-Infinity", 400, "not a finite number"),
    ("POST", "/api/decode", _Z % b"1e999", 400, "not a finite number"),
    ("POST", "/api/decode", _Z % b"1e6", 400, "outside [-100, 100]"),
    ("POST", "/api/decode", _Z % b"-100.001", 400, "outside [-100, 100]"),
    ("POST", "/api/decode", _Z % str(10**300).encode(), 400, "outside [-100, 100]"),
    ("POST", "/api/decode", _Z % b"true", 400, "must be a number"),
    ("POST", "/api/decode", _Z % b'"1"', 400, "must be a number"),
    ("POST", "/api/decode", _Z % b"null", 400, "must be a number"),
    ("POST", "/api/decode", _Z % b"[1]", 400, "must be a number"),
]


@pytest.mark.parametrize("method, target, body, status, message", BAD,
                         ids=[f"{m} {t[:30]} {b[:20]!r}" for m, t, b, _, _ in BAD])
def test_bad_requests_are_refused_before_the_model_and_the_filesystem(
        explorer, monkeypatch, method, target, body, status, message):
    page = load_page()
    touched = []

    def refuse(*args, **kwargs):
        touched.append(args[:1])
        raise AssertionError(f"reached {args[:1]}")

    monkeypatch.setattr(explorer.model, "decode", refuse)
    monkeypatch.setattr(explorer.model, "encode", refuse)
    for module, name in ((builtins, "open"), (io, "open"), (os, "open"), (os, "stat"),
                         (os, "listdir"), (os, "scandir")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(Path, "open", refuse)
    response = handle_request(explorer, page, method, target, body)
    monkeypatch.undo()
    assert touched == []
    assert response.status == status, response.body
    error = response.json()["error"]
    assert message in error and "\n" not in error and len(error) < 200, error


def test_a_foreign_host_header_is_refused(explorer):
    allowed = frozenset({"127.0.0.1:8000", "localhost:8000"})
    for host in ("evil.example", "evil.example:8000", "127.0.0.1:9", None):
        response = ask(explorer, "GET", "/api/meta", host=host, allowed_hosts=allowed)
        assert response.status == 403 and "Host" in response.json()["error"]
    assert ask(explorer, "GET", "/api/meta", host="localhost:8000",
               allowed_hosts=allowed).status == 200


def _raw(port: int, lines: list[str], body: bytes = b"") -> tuple[int, bytes]:
    """Send a hand-written request; return the status and the body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        conn = http.client.HTTPResponse(sock)
        conn.begin()
        return conn.status, conn.read()


def test_the_server_listens_on_loopback_and_refuses_bad_requests(explorer):
    server = make_server(explorer)  # the defaults: 127.0.0.1, a free port
    assert server.server_address[0] == "127.0.0.1" and server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == load_page()
        assert "default-src 'self'" in response.getheader("Content-Security-Policy")
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        z = [0.5, -0.5, 0.0, 1.0]
        conn.request("POST", "/api/decode", json.dumps({"z": z}),
                     {"Content-Type": "application/json"})  # same connection: keep-alive
        response = conn.getresponse()
        assert response.status == 200
        assert_shows(json.loads(response.read())["image"], decoder_mean(explorer.model, z))
        conn.request("GET", "/api/point/x")
        response = conn.getresponse()
        assert response.status == 400 and b"a test point" in response.read()
        conn.close()
        host = f"Host: 127.0.0.1:{server.port}"
        assert _raw(server.port, ["GET /../../etc/passwd HTTP/1.1", host])[0] == 400
        assert _raw(server.port, ["GET /nothing HTTP/1.1", host])[0] == 404
        assert _raw(server.port, ["GET / HTTP/1.1", "Host: evil.example"])[0] == 403
        assert _raw(server.port, ["POST /api/decode HTTP/1.1", host])[0] == 400
        # a huge announced body is refused without waiting for it
        start = time.monotonic()
        status, body = _raw(server.port, ["POST /api/decode HTTP/1.1", host,
                                          "Content-Length: 1000000000"])
        assert status == 400 and b"over" in body and time.monotonic() - start < 5
        status, _ = _raw(server.port, ["POST /api/decode HTTP/1.1", host,
                                       "Transfer-Encoding: chunked"], b"0\r\n\r\n")
        assert status == 400
        assert _raw(server.port, ["PUT / HTTP/1.1", host, "Content-Length: 2"], b"{}")[0] == 405
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- the plane


@pytest.mark.parametrize("n, latent", [(200, 1), (200, 2), (200, 6), (3, 6)])
def test_the_plane_is_the_figures_and_maps_back(n, latent):
    """``plots.latent_plane``: an orthonormal basis whose first two rows are the scatter's
    axes (PCA for L > 2, completed when there are fewer points than dimensions); z -> u -> z
    is the identity."""
    from vaelab import plots

    gen = torch.Generator().manual_seed(latent)
    loc = torch.randn(n, latent, generator=gen) * torch.linspace(3, 0.2, latent) + 1.5
    plane, xy = plots.scatter_points(loc, torch.arange(n) % 4)
    basis = plane.basis.numpy()
    np.testing.assert_allclose(basis @ basis.T, np.eye(latent), atol=1e-12)
    np.testing.assert_allclose(plane.latent(plane.coordinates(loc)).numpy(), loc.numpy(),
                               atol=1e-6)
    assert plane.explained.sum() == pytest.approx(1.0)
    if latent > 2:
        projected, explained = plots.pca_2d(loc)
        assert torch.equal(xy, projected) and torch.equal(plane.explained[:2], explained)
        assert plane.coordinates(loc)[:, 2:].pow(2).sum(0).argmax() == 0  # ordered by variance
    elif latent == 2:
        assert plane.kind == "latent" and torch.equal(xy, loc.double())
    else:
        assert torch.equal(xy[:, 0], loc[:, 0].double())
        assert (xy[:, 1] - (torch.arange(n) % 4)).abs().max() <= 0.3


# --------------------------------------------------------------------------- every model

KINDS = [(name, kind, {}) for name in sorted(likelihoods.LIKELIHOODS)
         for kind in sorted(models.MODELS)]
EXTRA = [
    ("bernoulli", "mlp", {"likelihood.bernoulli.unnormalized": "true"}),  # BCE on grey levels
    ("bernoulli", "mlp", {"prior.name": "vampprior", "prior.vampprior.components": 5}),
    ("gaussian", "mlp", {"prior.name": "mog"}),
    ("bernoulli", "mlp", {"posterior.flow": "planar"}),
    ("bernoulli", "mlp", {"posterior.flow": "iaf", "posterior.iaf.hidden": "16,16"}),
    ("bernoulli", "mlp", {"model.latent_dim": 1}),
    ("laplace", "conv", {"model.latent_dim": 2}),
]


def synthetic(likelihood: str, kind: str, extra: dict | None = None) -> Explorer:
    """An untrained model of ``likelihood`` and ``kind`` on 40 random 8x8 images (colour for
    the logistic mixture), dynamically binarised for a Bernoulli likelihood."""
    extra = extra or {}
    shape = (3 if likelihood == "discretized-logistic-mixture" else 1, 8, 8)
    overrides = {"likelihood.name": likelihood, "model.kind": kind, "model.latent_dim": 3,
                 **extra}
    cfg = config.resolve(overrides=[f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    model = models.build_from_config(cfg, shape)
    gen = torch.Generator().manual_seed(0)
    binary = likelihood == "bernoulli" and not extra.get("likelihood.bernoulli.unnormalized")
    images = torch.randint(0, 256, (40, *shape), generator=gen, dtype=torch.uint8)
    test = ImageSet(images, torch.arange(40) % 3, "synthetic", "test",
                    binarize="dynamic" if binary else "none")
    return Explorer(model, test, points=30, nll_samples=64, nelbo_samples=16)


@pytest.mark.parametrize("likelihood, kind, extra", KINDS + EXTRA,
                         ids=[f"{n}-{k}-{'-'.join(map(str, e.values()))}"
                              for n, k, e in KINDS + EXTRA])
def test_every_likelihood_and_model_kind(likelihood, kind, extra):
    """The page's answers are the model's, whatever the likelihood, model, prior, posterior
    and L (untrained models on synthetic images, grey and colour)."""
    explorer = synthetic(likelihood, kind, extra)
    model, test = explorer.model, explorer.test
    shape = test.event_shape
    binary = test.binarize == "dynamic"
    latent = model.latent_dim
    meta = ask(explorer, "GET", "/api/meta").json()
    assert meta["latent_dim"] == latent and meta["event_shape"] == list(shape)
    assert meta["plane"]["kind"] == ("pca" if latent > 2 else "latent")
    z = torch.linspace(-1.5, 1.5, latent).tolist()
    image = ask(explorer, "POST", "/api/decode", json.dumps({"z": z}).encode()).json()["image"]
    assert image["channels"] == shape[0]
    assert_shows(image, decoder_mean(model, z))
    point = ask(explorer, "GET", "/api/point/4").json()
    assert_shows(point["reconstruction"], decoder_mean(model, point["z"]))
    assert math.isfinite(point["nelbo"]["value"])
    family = model.likelihood
    assert pixels(point["input"]).shape == (8, 8, shape[0])
    if binary:
        assert point["original"] is not None and set(point["input"]["pixels"]) <= {0, 255}
    if family.normalized:
        assert math.isfinite(point["nll"]["value"]) and point["nll"]["samples"] == 64
    else:  # BCE on grey levels: no NLL is claimed
        assert point["nll"] is None and meta["nll_samples"] is None
    if latent == 2:  # the plane is the latent space itself
        np.testing.assert_allclose(meta["scatter"]["x"], explorer.loc[:, 0].numpy(), atol=1e-5)
    if latent == 1:  # a strip: x is z0, y separates the labels
        assert meta["plane"]["y"]["name"].startswith("label")
        assert np.all(np.abs(np.asarray(meta["scatter"]["y"]) - test.labels[:30].numpy()) <= 0.3)


class ColourVAE(torch.nn.Module):
    """A user's own colour model (the four members of the protocol, no vaelab base class):
    a Gaussian decoder whose mean is a different picture in each channel, moved by z
    (a swap of channels on the page would show)."""

    latent_dim = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.likelihood = likelihoods.get("gaussian", scale=0.1)
        self.enc = torch.nn.Linear(3 * 8 * 8, 6)
        ramp = torch.linspace(0.05, 0.95, 64).view(8, 8)
        self.register_buffer("pattern", torch.stack([ramp, ramp.T.flip(0), 1 - ramp]))

    def encode(self, x):
        loc, raw = self.enc(x.flatten(1)).chunk(2, -1)
        return torch.distributions.Independent(
            torch.distributions.Normal(loc, torch.nn.functional.softplus(raw) + 1e-3), 1)

    def decode(self, z):
        shift = 0.2 * torch.tanh(z[:, :3]).view(-1, 3, 1, 1)
        return self.likelihood(self.pattern.unsqueeze(0) + shift)

    def prior(self, device=None):
        zero = torch.zeros(3, device=device)
        return torch.distributions.Independent(torch.distributions.Normal(zero, 1 + zero), 1)

    @staticmethod
    def images() -> ImageSet:
        gen = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (40, 3, 8, 8), generator=gen, dtype=torch.uint8)
        return ImageSet(images, torch.arange(40) % 2, "colour", "test")


def test_your_own_colour_model():
    explorer = Explorer(ColourVAE(), ColourVAE.images(), points=40, nll_samples=50)
    z = [0.3, -0.8, 1.5]
    image = ask(explorer, "POST", "/api/decode", json.dumps({"z": z}).encode()).json()["image"]
    expected = decoder_mean(explorer.model, z)
    assert image["channels"] == 3 and np.ptp(expected, axis=2).max() > 0.3
    assert_shows(image, expected)
    point = ask(explorer, "GET", "/api/point/5").json()
    np.testing.assert_array_equal(pixels(point["input"]),
                                  explorer.test.images[5].permute(1, 2, 0).numpy())
    assert math.isfinite(point["nll"]["value"]) and point["original"] is None


# --------------------------------------------------------------------------- the command


def test_the_command_has_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["explore", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "usage: vaelab explore" in out
    assert "(default: 127.0.0.1" in out and "--no-browser" in out and "(default: 2000)" in out


def test_the_command_refuses_bad_input(run_dir, tmp_path, capsys):
    cases = [(["explore", str(tmp_path / "missing")], "does not exist"),
             (["explore", str(run_dir), "--points", "0"], "--points must be positive"),
             (["explore", str(run_dir), "--port", "70000"], "--port must be in 0..65535")]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases.append((["explore", str(run_dir), "--port", str(busy.getsockname()[1]),
                       "--no-browser", "--points", "10"], "cannot listen on 127.0.0.1"))
        for argv, message in cases:
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("vaelab: error: ") and message in err, err
            assert err.count("\n") == 1


def test_closing_the_server_ends_idle_connections_and_joins_their_threads(explorer):
    """Ctrl-C leaves no connection thread running while the interpreter exits (a daemon
    thread woken during finalisation can abort the process): server_close ends a browser's
    idle keep-alive connection and joins its thread."""
    server = make_server(explorer)
    before = set(threading.enumerate())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/api/meta")
        assert conn.getresponse().read()  # the connection stays open (keep-alive)
        handlers = set(threading.enumerate()) - before - {thread}
        assert handlers and not any(t.daemon for t in handlers)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert not any(t.is_alive() for t in handlers)
    conn.close()


def test_the_command_prints_the_url_and_stops_on_ctrl_c(run_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaelab", "explore", str(run_dir), "--port", "0", "--points",
         "100", "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("vaelab explore: http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split()[2]
        port = int(url.rsplit(":", 1)[1].strip("/"))
        # generous timeouts: they only bound a failure, and a loaded CI machine is slow
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/api/meta")
        meta = json.loads(conn.getresponse().read())
        assert meta["n_points"] == 100 and meta["info"]["run"] == run_dir.name
        conn.close()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        err = proc.stderr.read()
        assert code == 0, err
        assert "stopped" in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- a real browser


def _chromium() -> str | None:
    for name in (os.environ.get("VAELAB_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _wait(page, expression: str, timeout: float = 15.0):
    """Poll ``expression`` in the page until truthy (the page's CSP rules out Playwright's
    ``wait_for_function``, which evaluates strings inside the page)."""
    end = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {expression}"
        time.sleep(0.02)


IDLE = "document.body.dataset.ready && !window.explorer.pending && !window.explorer.queued"
SHOWN = """(() => { const c = document.getElementById('decoded');
  return { z: JSON.parse(c.dataset.z), w: c.width, h: c.height,
           rgba: Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data) };
})()"""


FAR_POINT = """(() => { const s = window.explorer.meta.scatter;
  const [hx, hy] = toPixel(window.explorer.hx, window.explorer.hy);
  for (let i = 0; i < s.x.length; i++) {
    const [px, py] = toPixel(s.x[i], s.y[i]);
    if (Math.hypot(px - hx, py - hy) > 30) return [px, py];
  }
})()"""


def _shown(page) -> tuple[list[float], np.ndarray]:
    """The z of the image on the page and that image's pixels ``(H, W, 3)`` read back from
    its canvas."""
    shown = page.evaluate(SHOWN)
    rgba = np.asarray(shown["rgba"], dtype=np.float64).reshape(shown["h"], shown["w"], 4)
    assert (rgba[..., 3] == 255).all()
    return shown["z"], rgba[..., :3]


def test_the_page_in_headless_chromium(explorer, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright for Python is not installed")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium; or set "
                    "VAELAB_CHROMIUM)")
    server = make_server(explorer)
    servers = [server]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    problems: list[str] = []
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, headless=True)
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("console", lambda msg: problems.append(msg.text)
                    if msg.type == "error" else None)
            page.goto(server.url)
            _wait(page, IDLE)
            start_z, start_image = _shown(page)
            # drag the point: press on it, move in steps, release
            box = page.locator("#plane").bounding_box()
            hx, hy = page.evaluate("JSON.parse(document.getElementById('plane').dataset.handle)")
            page.mouse.move(box["x"] + hx, box["y"] + hy)
            page.mouse.down()
            for step in range(1, 13):
                page.mouse.move(box["x"] + hx - 12 * step, box["y"] + hy + 7 * step)
            page.mouse.up()
            _wait(page, IDLE)
            z, image = _shown(page)
            moved = page.evaluate("JSON.parse(document.getElementById('plane').dataset.handle)")
            assert moved == pytest.approx([hx - 144, hy + 84], abs=1.0)
            assert np.abs(np.asarray(z) - start_z).max() > 0.05
            expected = decoder_mean(explorer.model, z)
            assert np.abs(image / 255 - expected).max() <= 1 / 255  # every channel, every pixel
            assert np.abs(image - start_image).max() > 0  # the picture changed with the point
            # a slider (u_2) moved with the keyboard changes z along the third axis only
            slider = page.locator("#sliders input[type=range]").first
            slider.focus()
            for _ in range(60):
                page.keyboard.press("ArrowRight")
            _wait(page, IDLE)
            z_slider, image = _shown(page)
            plane = explorer.plane
            du = (np.asarray(z_slider) - z) @ plane.basis.numpy().T
            assert du[2] > 0.05 and np.abs(du[[0, 1, 3]]).max() < 1e-6
            assert np.abs(image / 255 - decoder_mean(explorer.model, z_slider)).max() <= 1 / 255
            # click a test point (away from the red point, which a press would drag): its
            # images and numbers, and the red point jumps to its E_q[z|x]
            px, py = page.evaluate(FAR_POINT)
            nearest = page.evaluate(f"nearestPoint({px}, {py}, 5)")
            page.mouse.click(box["x"] + px, box["y"] + py)
            _wait(page, "document.getElementById('example-numbers') !== null")
            _wait(page, IDLE)
            clicked = int(page.evaluate("document.getElementById('example').dataset.index"))
            assert clicked == nearest
            point = explorer.point(clicked)
            text = page.inner_text("#example-numbers")
            assert f"{point['nelbo']['value']:.2f}" in text and "K = 1000" in text
            assert f"{point['nll']['value']:.2f}" in text
            z, image = _shown(page)
            assert z == pytest.approx(point["z"], abs=1e-7)
            assert np.abs(image / 255 - decoder_mean(explorer.model, z)).max() <= 1 / 255
            recon = page.evaluate("""(() => { const c = document.getElementById(
                'example-reconstruction'); return Array.from(c.getContext('2d').getImageData(
                0, 0, c.width, c.height).data); })()""")
            recon = np.asarray(recon, dtype=np.float64).reshape(28, 28, 4)[..., 0]
            assert np.array_equal(recon, pixels(point["reconstruction"])[..., 0])
            shot = tmp_path / "explore.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            # colour: a model of your own whose three channels differ
            colour = Explorer(ColourVAE(), ColourVAE.images(), points=40)
            servers.append(make_server(colour))
            threading.Thread(target=servers[-1].serve_forever, daemon=True).start()
            page.goto(servers[-1].url)
            _wait(page, IDLE)
            page.mouse.click(box["x"] + 60, box["y"] + 60)  # away from the points: moves z
            _wait(page, IDLE)
            z, image = _shown(page)
            expected = decoder_mean(colour.model, z)
            assert expected.shape == (8, 8, 3) and np.ptp(expected, axis=2).max() > 0.3
            assert np.abs(image / 255 - expected).max() <= 1 / 255
            browser.close()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert problems == []
