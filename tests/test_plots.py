"""Figures: exact image-grid layout, latent helpers against reference math, and every
figure of a tiny real Fashion-MNIST run produced, valid and not blank."""

from __future__ import annotations

import colorsys
import dataclasses
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides, train
from vaelab import config, grids, plots
from vaelab.data import Splits
from vaelab.errors import CheckpointError, ConfigError, VaelabError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(path: Path) -> np.ndarray:
    """Check ``path`` is a complete PNG and return its pixels (H, W[, C]) as uint8."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[-12:-8] == struct.pack(">I", 0) and data[-8:-4] == b"IEND", path
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB") if image.mode in ("RGBA", "P") else image)


# --------------------------------------------------------------------------- image grids


def test_make_grid_layout_is_exact():
    # 3 images of H=2 x W=3 (non-square, so a swapped axis shows), 2 per row, padding 1:
    # 2 rows -> H' = 2 * (2 + 1) + 1 = 7; 2 columns -> W' = 2 * (3 + 1) + 1 = 9.
    images = torch.stack([torch.full((1, 2, 3), v) for v in (0.0, 0.2, 0.4)])
    images[1, 0, 1, 2] = 0.6  # one marked pixel: bottom-right of image 1
    grid = grids.make_grid(images, nrow=2, padding=1, pad_value=1.0)
    assert grid.shape == (1, 7, 9)
    expected = torch.ones(7, 9)
    expected[1:3, 1:4] = 0.0  # image 0: row 1, col 1
    expected[1:3, 5:8] = 0.2  # image 1: row 1, col 1 + (3 + 1)
    expected[2, 7] = 0.6
    expected[4:6, 1:4] = 0.4  # image 2: row 1 + (2 + 1), col 1; cell 3 stays padding
    assert torch.equal(grid[0], expected)


def test_save_image_grid_writes_the_grid_pixels(tmp_path):
    images = torch.stack([torch.full((1, 2, 3), v) for v in (0.0, 0.2, 0.4)])
    path = grids.save_image_grid(images, tmp_path / "sub" / "g.png", nrow=2, padding=1)
    assert path == tmp_path / "sub" / "g.png"
    pixels = _png(path)
    assert pixels.shape == (7, 9) and pixels.dtype == np.uint8  # greyscale, H x W
    assert pixels[1, 1] == 0 and pixels[1, 5] == round(0.2 * 255) == 51
    assert pixels[4, 1] == round(0.4 * 255) == 102
    assert pixels[0, 0] == 255 and pixels[5, 6] == 255  # padding and the empty cell


def test_save_image_grid_rgb_and_clamping(tmp_path):
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = 1.0  # red
    images[1, 2] = 2.0  # blue, out of range: clamped to 1
    images[1, 1] = -1.0  # clamped to 0
    pixels = _png(grids.save_image_grid(images, tmp_path / "rgb.png", nrow=8, padding=2,
                                        pad_value=0.0))
    assert pixels.shape == (4 + 4, 2 * 6 + 2, 3)
    assert pixels[2, 2].tolist() == [255, 0, 0]
    assert pixels[2, 8].tolist() == [0, 0, 255]
    assert pixels[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "images, kwargs",
    [
        (torch.zeros(4, 28, 28), {}),  # no channel axis
        (torch.zeros(4, 2, 8, 8), {}),  # two channels
        (torch.zeros(0, 1, 8, 8), {}),  # empty
        (torch.full((1, 1, 2, 2), float("nan")), {}),
        (torch.zeros(1, 1, 2, 2), {"nrow": 0}),
    ],
)
def test_make_grid_rejects_bad_input(images, kwargs):
    with pytest.raises(VaelabError):
        grids.make_grid(images, **kwargs)


# --------------------------------------------------------------------------- latent helpers


@pytest.mark.parametrize(
    "kl, k, expected",
    [
        ([0.1, 2.0, 0.5, 3.0], 2, [3, 1]),
        ([0.1, 2.0, 0.5, 3.0], 4, [3, 1, 2, 0]),
        ([1.0, 1.0, 1.0], 2, [0, 1]),  # ties: lower index first
        ([0.3], 2, [0]),  # k larger than L
        (torch.tensor([0.0, 5.0, 4.0]), 1, [1]),
    ],
)
def test_top_kl_dims(kl, k, expected):
    assert plots.top_kl_dims(kl, k) == expected


def test_manifold_grid_is_an_inverse_normal_cdf_grid():
    from scipy.stats import norm

    n = 7
    z, values = plots.manifold_grid(5, [3, 1], n)
    expected = norm.ppf(np.linspace(0.05, 0.95, n))
    np.testing.assert_allclose(values.numpy(), expected, rtol=0, atol=1e-6)
    assert values[0] == pytest.approx(-1.6448536, abs=1e-6)
    grid = z.view(n, n, 5)
    # columns walk dims[0] upwards, rows walk dims[1] downwards (large values on top)
    assert torch.equal(grid[:, :, 3], values.view(1, n).expand(n, n))
    assert torch.equal(grid[:, :, 1], values.flip(0).view(n, 1).expand(n, n))
    assert torch.count_nonzero(grid[:, :, [0, 2, 4]]) == 0
    # one latent dimension: a single row
    z1, _ = plots.manifold_grid(1, [0], n)
    assert z1.shape == (n, 1) and torch.equal(z1[:, 0], values)


def test_traversal_latents_vary_one_dimension_per_row():
    base = torch.tensor([0.5, -1.0, 2.0, 0.25])
    z, values = plots.traversal_latents(base, [2, 0], steps=5, limit=3.0)
    assert values.tolist() == [-3.0, -1.5, 0.0, 1.5, 3.0]
    rows = z.view(2, 5, 4)
    assert torch.equal(rows[0, :, 2], values) and torch.equal(rows[1, :, 0], values)
    assert torch.equal(rows[0, :, [0, 1, 3]], base[[0, 1, 3]].expand(5, 3))
    assert torch.equal(rows[1, :, [1, 2, 3]], base[[1, 2, 3]].expand(5, 3))


def test_pca_2d_matches_numpy_eigendecomposition():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(300, 5)) @ np.diag([5.0, 3.0, 1.0, 0.5, 0.1]) + 7.0
    projected, explained = plots.pca_2d(torch.from_numpy(points))
    eig = np.sort(np.linalg.eigvalsh(np.cov(points.T)))[::-1]
    np.testing.assert_allclose(projected.var(0, unbiased=True).numpy(), eig[:2], rtol=1e-10)
    np.testing.assert_allclose(explained.numpy(), eig[:2] / eig.sum(), rtol=1e-10)
    assert abs(float(projected[:, 0] @ projected[:, 1])) < 1e-8  # uncorrelated
    # deterministic sign: the largest loading is positive, so a flipped input gives the
    # same picture up to that convention
    again, _ = plots.pca_2d(torch.from_numpy(points))
    assert torch.equal(projected, again)


# --------------------------------------------------------------------------- metrics and errors


def test_read_metrics_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no metrics.jsonl"):
        plots.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="no epochs"):
        plots.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2\n')
    with pytest.raises(CheckpointError, match="line 2 is not JSON"):
        plots.read_metrics(tmp_path)


def test_plot_run_on_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        plots.plot_run(tmp_path / "nope")
    with pytest.raises(CheckpointError):
        plots.sample_figure(tmp_path / "nope")


# --------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_available):
    directory = tmp_path_factory.mktemp("plots_run")
    cfg = config.resolve(overrides=tiny_overrides())
    train(cfg, directory, progress=False, echo=lambda _line: None)
    return directory


@pytest.fixture()
def run_copy(run_dir, tmp_path):
    """A private copy of the run that a test may modify."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("figures", ".lock"))
    return copy


def _check_figure(path: Path, min_side: int = 100) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000, path
    pixels = _png(path)
    height, width = pixels.shape[:2]
    assert min_side <= height <= 2500 and min_side <= width <= 2500, (path, pixels.shape)
    assert pixels.astype(np.float64).std() > 5.0, path  # not blank
    return pixels


def test_train_writes_every_figure(run_dir):
    figures = run_dir / "figures"
    for stem in plots.FIGURES:
        _check_figure(figures / f"{stem}.png")
    # one sample grid per epoch from the same fixed z: 64 images of 28x28, 8 per row
    epochs = sorted((figures / "samples").glob("epoch-*.png"))
    assert [p.name for p in epochs] == ["epoch-001.png", "epoch-002.png"]
    first, second = (_png(p) for p in epochs)
    assert first.shape == second.shape == (8 * 30 + 2, 8 * 30 + 2)
    assert not np.array_equal(first, second)  # the model changed between epochs


def test_plot_run_writes_all_figures_to_out_dir(run_dir, tmp_path):
    out = tmp_path / "figs"
    written = plots.plot_run(run_dir, checkpoint="last", out_dir=out)
    assert written == [out / f"{stem}.png" for stem in plots.FIGURES]
    sizes = {p.stem: _check_figure(p).shape[:2] for p in written}
    # the manifold is a 15 x 15 grid of 28-pixel tiles: at least 420 pixels square
    assert min(sizes["manifold"]) >= 420
    # plot_run is deterministic: running it again gives the same pixels
    again = plots.plot_run(run_dir, checkpoint="last", out_dir=tmp_path / "again")
    for a, b in zip(written, again):
        if a.stem != "training_curves":
            assert np.array_equal(_png(a), _png(b)), a.name


def test_epoch_samples_are_the_decoder_means_at_the_fixed_z(run_dir):
    from vaelab.rng import Purpose, seeded_generator
    from vaelab.runs import open_run

    model = open_run(run_dir, "last").model
    # the trainer's fixed z: 64 draws seeded by (train seed, 0, SAMPLES)
    z = torch.randn(64, model.latent_dim, generator=seeded_generator(0, 0, Purpose.SAMPLES))
    pixels = _png(run_dir / "figures" / "samples" / "epoch-002.png")
    # 64 images -> 8 per row (ceil sqrt 64), 8 rows, padding 2
    assert pixels.shape == (8 * 30 + 2, 8 * 30 + 2)
    with torch.no_grad():
        means = model.decode(z).mean
    expected = (means[9, 0] * 255).round().to(torch.uint8).numpy()  # row 1, column 1
    assert np.abs(pixels[32:60, 32:60].astype(int) - expected.astype(int)).max() <= 1


def _spy(monkeypatch, name):
    calls = []
    original = getattr(plots, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(plots, name, spy)
    return calls


def _write_report(run_dir: Path, kl: list[float], checkpoint: str = "best") -> None:
    path = run_dir / "report.json"
    report = json.loads(path.read_text())
    report.update(kl_per_dim=kl, latent_variance=[1.0] * len(kl), checkpoint=checkpoint)
    path.write_text(json.dumps(report))


def test_manifold_and_traversals_use_the_largest_kl_dims(run_copy, monkeypatch):
    _write_report(run_copy, [0.1, 2.0, 0.5, 3.0])
    manifold = _spy(monkeypatch, "manifold_grid")
    traversal = _spy(monkeypatch, "traversal_latents")
    written = plots.plot_run(run_copy, figures=["manifold", "traversals"])
    assert [p.name for p in written] == ["manifold.png", "traversals.png"]
    (args, _), = manifold
    assert args[0] == 4 and list(args[1]) == [3, 1]
    (args, _), = traversal
    assert list(args[1]) == [3, 1, 2, 0]


def test_kl_falls_back_to_the_encoder_when_the_report_does_not_fit(run_copy, monkeypatch):
    report = json.loads((run_copy / "report.json").read_text())
    true_order = plots.top_kl_dims(report["kl_per_dim"], 4)
    # a report for another checkpoint with the opposite ranking must be ignored
    fake = [0.0] * 4
    for rank, dim in enumerate(true_order):
        fake[dim] = float(rank)
    _write_report(run_copy, fake, checkpoint="best")
    manifold = _spy(monkeypatch, "manifold_grid")
    plots.plot_run(run_copy, checkpoint="last", figures=["manifold"])
    plots.plot_run(run_copy, checkpoint="best", figures=["manifold"])
    assert list(manifold[0][0][1]) == true_order[:2]
    assert list(manifold[1][0][1]) == plots.top_kl_dims(fake, 2) == true_order[::-1][:2]
    # The fallback (the analytic KL on the same 200 test examples, vaelab.metrics) equals
    # the report's KL per dimension: the test split is binarised once (static), so the
    # inputs are identical.
    (run_copy / "report.json").unlink()
    from vaelab import metrics
    from vaelab.data import load_split
    from vaelab.runs import open_run

    run = open_run(run_copy)
    test = load_split(run.config.data, "test", run.config.train.seed)
    computed = metrics.elbo_metrics(run.model, test.subset(torch.arange(200)))["kl_per_dim"]
    np.testing.assert_allclose(computed, report["kl_per_dim"], rtol=1e-4, atol=1e-6)
    plots.plot_run(run_copy, checkpoint="best", figures=["manifold"])
    assert list(manifold[2][0][1]) == plots.top_kl_dims(computed, 2)


def _saturated_hues(pixels: np.ndarray) -> np.ndarray:
    """Hues (degrees) of the clearly coloured pixels of an RGB image."""
    rgb = pixels[..., :3].reshape(-1, 3) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in np.unique(rgb, axis=0)])
    return hsv[(hsv[:, 1] > 0.4) & (hsv[:, 2] > 0.3), 0] * 360


def test_latent_scatter_without_labels_is_one_colour(run_dir, tmp_path, monkeypatch):
    labelled = _png(plots.plot_run(run_dir, out_dir=tmp_path / "a",
                                   figures=["latent_scatter"])[0])
    original = Splits.__getitem__
    monkeypatch.setattr(
        Splits, "__getitem__",
        lambda self, split: dataclasses.replace(original(self, split), labels=None),
    )
    unlabelled = _png(plots.plot_run(run_dir, out_dir=tmp_path / "b",
                                     figures=["latent_scatter"])[0])
    _check_figure(tmp_path / "b" / "latent_scatter.png")
    # tab:blue has hue ~205 degrees; ten classes add orange, green, red, purple, ...
    hues = _saturated_hues(unlabelled)
    assert hues.size > 0 and np.all((hues > 190) & (hues < 225))
    hues = _saturated_hues(labelled)
    assert np.any(hues < 60)  # orange/red classes are there


def test_training_curves_without_train_nelbo(run_copy):
    # an IWAE run logs only the training objective
    rows = plots.read_metrics(run_copy)
    for row in rows:
        row.update(train_nelbo=None, train_recon=None, train_kl=None)
    (run_copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (written,) = plots.plot_run(run_copy, figures=["training_curves"])
    _check_figure(written)


def test_plot_run_without_metrics(run_copy):
    with pytest.raises(ConfigError, match="unknown figure 'histogram'"):
        plots.plot_run(run_copy, figures=["manifold", "histogram"])
    (run_copy / "metrics.jsonl").unlink()
    with pytest.raises(CheckpointError, match="no metrics.jsonl"):
        plots.plot_run(run_copy)


def test_sample_figure_is_reproducible(run_dir, tmp_path):
    a = plots.sample_figure(run_dir, n=10, seed=1, out=tmp_path / "a.png")
    b = plots.sample_figure(run_dir, n=10, seed=1, out=tmp_path / "b.png")
    c = plots.sample_figure(run_dir, n=10, seed=2, out=tmp_path / "c.png")
    assert a.read_bytes() == b.read_bytes()
    pa, pc = _png(a), _png(c)
    # 10 samples -> 4 per row, 3 rows of 28-pixel images with padding 2
    assert pa.shape == (3 * 30 + 2, 4 * 30 + 2)
    assert not np.array_equal(pa, pc)
    # Bernoulli samples are 0/1 pixels; the white padding is 255
    assert set(np.unique(pa).tolist()) <= {0, 255}
    mean = _png(plots.sample_figure(run_dir, n=10, seed=1, mean=True, out=tmp_path / "m.png"))
    assert len(np.unique(mean)) > 20  # decoder means are grey levels


def test_sample_figure_default_path(run_copy):
    path = plots.sample_figure(run_copy, n=4, seed=7, checkpoint="last")
    assert path == run_copy / "figures" / "samples-last-seed7.png"
    assert _png(path).shape == (2 * 30 + 2, 2 * 30 + 2)
    path = plots.sample_figure(run_copy, n=4, seed=7, mean=True)
    assert path == run_copy / "figures" / "samples-best-seed7-mean.png"
    with pytest.raises(VaelabError, match="positive"):
        plots.sample_figure(run_copy, n=0)
