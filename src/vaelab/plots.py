r"""Figures of a run: image grids (Pillow) and the analysis figures (matplotlib).

Two kinds of output:

- :func:`save_image_grid`, :func:`epoch_samples` and :func:`sample_figure` write bare
  image grids with Pillow only (fast; the trainer calls :func:`epoch_samples` every
  epoch with the same fixed ``z``, so the grids of successive epochs are comparable).
- :func:`plot_run` writes the analysis figures of a finished run with matplotlib
  (Agg canvas, imported lazily, no global pyplot state):

  ===========================  ==========================================================
  ``reconstructions.png``      the first 16 test examples and the decoder mean at
                               :math:`z = \mathbb{E}_q[z]`
  ``samples.png``              decoder means for 64 fixed :math:`z \sim N(0, I)` (the same
                               ``z`` as the per-epoch grids)
  ``manifold.png``             decoder means on an inverse-normal-CDF grid over the two
                               latent dimensions with the largest KL, the others at zero
                               (Kingma & Welling 2014, fig. 4)
  ``latent_scatter.png``       encoder means of up to 2000 test examples coloured by label
                               (PCA to two dimensions beyond two latent dimensions)
  ``training_curves.png``      train and validation NELBO, reconstruction and KL per epoch
  ``kl_per_dim.png``           KL of each latent dimension, sorted, active units marked
                               (Burda et al. 2016: Var_x E_q[z_j] > 0.01)
  ``traversals.png``           one latent dimension at a time from -3 to 3 prior standard
                               deviations, dimensions ordered by KL
  ===========================  ==========================================================

Every figure states the split, the checkpoint (and its epoch) and its units.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError, VaelabError

__all__ = [
    "FIGURES",
    "FASHION_MNIST_CLASSES",
    "make_grid",
    "save_image_grid",
    "epoch_samples",
    "sample_figure",
    "plot_run",
    "read_metrics",
    "top_kl_dims",
    "gaussian_kl_per_dim",
    "manifold_grid",
    "traversal_latents",
    "pca_2d",
]

FIGURES = (
    "reconstructions",
    "samples",
    "manifold",
    "latent_scatter",
    "training_curves",
    "kl_per_dim",
    "traversals",
)
"""Stems of the PNG files :func:`plot_run` writes, in order."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

ACTIVE_UNIT_THRESHOLD = 0.01
"""Burda et al. (2016): dimension j is active when Var_x(E_q[z_j]) > 0.01."""

_N_RECONSTRUCTIONS = 16
_N_SCATTER = 2000
_N_SAMPLES = 64
_MANIFOLD_SIZE = 15
_TRAVERSAL_DIMS = 8
_TRAVERSAL_STEPS = 9
_DPI = 100
# Generator purpose for the inputs of the figures (dynamic binarisation); see train.py.
_FIGURE_BINARIZE = 21
_SAMPLE_DRAW = 22


# --------------------------------------------------------------------------- image grids


def make_grid(images: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile ``images (N, C, H, W)`` in [0, 1] into one image ``(C, H', W')``.

    Images fill rows of ``nrow`` left to right, top to bottom (the last row may be
    short; empty cells keep ``pad_value``). With ``r = ceil(N / nrow)`` rows and
    ``c = min(N, nrow)`` columns, ``H' = r (H + padding) + padding`` and
    ``W' = c (W + padding) + padding``; image ``i`` starts at row
    ``padding + (i // nrow) (H + padding)`` and column ``padding + (i % nrow) (W + padding)``.

    Raises:
        VaelabError: wrong shape, channel count not 1 or 3, NaN/Inf values, ``nrow < 1``
            or ``padding < 0``.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise VaelabError(
            f"an image grid needs images shaped (N, C, H, W) with N >= 1 and C in (1, 3), got "
            f"{tuple(images.shape)}: reshape the batch (e.g. x.view(-1, 1, 28, 28))"
        )
    if nrow < 1 or padding < 0:
        raise VaelabError(f"nrow must be >= 1 and padding >= 0, got nrow={nrow}, "
                          f"padding={padding}")
    images = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).sum())
        raise VaelabError(f"cannot draw {bad} NaN/Inf pixel values: check the decoder output")
    n, channels, height, width = images.shape
    cols = min(n, nrow)
    rows = math.ceil(n / nrow)
    grid = torch.full(
        (channels, rows * (height + padding) + padding, cols * (width + padding) + padding),
        float(pad_value),
    )
    for i in range(n):
        top = padding + (i // nrow) * (height + padding)
        left = padding + (i % nrow) * (width + padding)
        grid[:, top:top + height, left:left + width] = images[i]
    return grid.clamp(0.0, 1.0)


def _to_uint8(grid: Tensor) -> np.ndarray:
    """``(C, H, W)`` floats in [0, 1] -> ``(H, W)`` or ``(H, W, 3)`` uint8 (round to nearest)."""
    array = (grid.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    return array.numpy()


def _write_bytes(path: Path, data: bytes) -> Path:
    from ._io import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, sync_dir=False)
    return path


def save_image_grid(
    images: Tensor,
    path: str | Path,
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 1.0,
) -> Path:
    """Write ``images (N, C, H, W)`` in [0, 1] as one PNG grid (see :func:`make_grid`).

    Pixels are ``round(255 * x)``; C = 1 gives a greyscale PNG, C = 3 an RGB one. The
    file is written atomically and its directory is created.

    Returns:
        the path written.
    """
    from PIL import Image

    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(grid)).save(buffer, format="PNG")
    return _write_bytes(Path(path), buffer.getvalue())


def _unit_images(x: Tensor, family: nn.Module) -> Tensor:
    """Model inputs or samples in data units -> floats in [0, 1] for display."""
    if getattr(family, "data_kind", None) == "uint8" or not x.is_floating_point():
        return x.float() / 255.0
    return x.float().clamp(0.0, 1.0)


@torch.no_grad()
def epoch_samples(model: nn.Module, z_fixed: Tensor, path: str | Path) -> Path:
    """Decode the fixed ``z_fixed (N, L)`` and save the decoder means as a grid PNG.

    The trainer calls this after every epoch with the same ``z``, so that grids of
    successive epochs show how the same latent points evolve.
    """
    means = model.decode(z_fixed).mean
    return save_image_grid(means, path, nrow=_grid_columns(len(z_fixed)))


def _grid_columns(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))


def sample_figure(
    run_dir: str | Path,
    n: int = 64,
    seed: int = 0,
    checkpoint: str = "best",
    mean: bool = False,
    out: str | Path | None = None,
) -> Path:
    """Draw ``n`` samples from the prior of a run's model into a grid PNG.

    ``z ~ N(0, I)`` is drawn from a generator seeded by ``seed``; the image is a sample
    of p(x|z) (``mean=False``, also seeded) or the decoder mean. The same arguments give
    the same file.

    Returns:
        the path written; default ``RUN_DIR/figures/samples-<checkpoint>-seed<seed>.png``
        (``...-mean.png`` for decoder means).

    Raises:
        CheckpointError: the run directory or checkpoint is missing.
        VaelabError: ``n < 1``.
    """
    from .runs import open_run
    from .train import seeded_generator

    if n < 1:
        raise VaelabError(f"the number of samples must be positive, got n={n}")
    run = open_run(run_dir, checkpoint)
    model = run.model
    z = torch.randn(n, model.latent_dim, generator=seeded_generator(seed, 0, _SAMPLE_DRAW))
    with torch.no_grad():
        px = model.decode(z)
        if mean:
            images = px.mean
        else:
            images = _unit_images(px.sample(generator=seeded_generator(seed, 1, _SAMPLE_DRAW)),
                                  model.likelihood)
    if out is None:
        suffix = "-mean" if mean else ""
        out = run.directory / "figures" / f"samples-{checkpoint}-seed{seed}{suffix}.png"
    return save_image_grid(images, out, nrow=_grid_columns(n))


# --------------------------------------------------------------------------- latent helpers


def top_kl_dims(kl_per_dim: Sequence[float] | Tensor, k: int) -> list[int]:
    """Indices of the ``k`` latent dimensions with the largest KL, largest first.

    Ties keep the lower index first; ``k`` larger than ``L`` returns all ``L``.
    """
    values = torch.as_tensor(kl_per_dim, dtype=torch.float64).flatten()
    order = sorted(range(values.numel()), key=lambda j: (-float(values[j]), j))
    return order[: max(0, k)]


def gaussian_kl_per_dim(loc: Tensor, scale: Tensor) -> Tensor:
    r"""Average over examples of KL(N(loc, scale^2) || N(0, 1)) per dimension, in nats.

    .. math:: \mathrm{KL}_j = \tfrac12(\mu_j^2 + \sigma_j^2 - 1) - \log \sigma_j

    Args:
        loc, scale: ``(B, L)`` encoder means and standard deviations.

    Returns:
        ``(L,)`` float64.
    """
    loc, scale = loc.double(), scale.double()
    return (0.5 * (loc**2 + scale**2 - 1.0) - torch.log(scale)).mean(0)


def manifold_grid(
    latent_dim: int, dims: Sequence[int], n: int = _MANIFOLD_SIZE
) -> tuple[Tensor, Tensor]:
    r"""Latent points of the manifold figure: an ``n x n`` grid over two dimensions.

    The grid values are :math:`\Phi^{-1}(p)` for ``p = linspace(0.05, 0.95, n)`` (equal
    prior mass between neighbours, Kingma & Welling 2014); every other dimension is 0.
    Row ``r`` (top to bottom) holds the ``(n - 1 - r)``-th value of ``dims[1]`` (large
    values at the top), column ``c`` the ``c``-th value of ``dims[0]``. With one latent
    dimension (``len(dims) == 1``) the grid is a single row.

    Returns:
        ``z (rows * n, L)`` in row-major order and the grid ``values (n,)``.
    """
    probs = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    values = torch.distributions.Normal(0.0, 1.0).icdf(probs).float()
    rows = 1 if len(dims) == 1 else n
    z = torch.zeros(rows, n, latent_dim)
    z[:, :, dims[0]] = values.view(1, n)
    if len(dims) > 1:
        z[:, :, dims[1]] = values.flip(0).view(rows, 1)
    return z.reshape(rows * n, latent_dim), values


def traversal_latents(
    base: Tensor, dims: Sequence[int], steps: int = _TRAVERSAL_STEPS, limit: float = 3.0
) -> tuple[Tensor, Tensor]:
    """Latent points of the traversal figure.

    Row ``i`` sets dimension ``dims[i]`` to ``linspace(-limit, limit, steps)`` (prior
    standard deviations) and keeps every other dimension at ``base (L,)``.

    Returns:
        ``z (len(dims) * steps, L)`` in row-major order and the ``values (steps,)``.
    """
    values = torch.linspace(-limit, limit, steps)
    z = base.float().reshape(1, 1, -1).repeat(len(dims), steps, 1)
    for row, dim in enumerate(dims):
        z[row, :, dim] = values
    return z.reshape(len(dims) * steps, -1), values


def pca_2d(points: Tensor) -> tuple[Tensor, Tensor]:
    """Project ``points (N, L)`` on their first two principal components.

    Uses the SVD of the centred float64 data; each component's sign is fixed so that
    its largest-magnitude loading is positive (reproducible pictures).

    Returns:
        ``projected (N, 2)`` float64 and the fraction of the total variance that each of
        the two components explains ``(2,)``.
    """
    centred = points.double() - points.double().mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    index = components.abs().argmax(1)
    signs = torch.sign(components[torch.arange(components.shape[0]), index])
    components = components * signs[:, None]
    total = (singular**2).sum()
    explained = (singular[:2] ** 2) / total if total > 0 else torch.zeros(2, dtype=torch.float64)
    return centred @ components.T, explained


# --------------------------------------------------------------------------- run context


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``RUN_DIR/metrics.jsonl``.

    Raises:
        CheckpointError: the file is missing, empty or not JSON lines.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} has no metrics.jsonl: give the directory of a vaelab train run that "
            "finished at least one epoch"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{path} is not text (JSON lines): the file is damaged or was replaced; "
            "re-run or resume training to rewrite it"
        ) from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise CheckpointError(
                f"{path} line {number} is not JSON: the file is damaged; re-run or resume training"
            ) from None
    if not records:
        raise CheckpointError(f"{path} holds no epochs: train for at least one epoch first")
    return records


@dataclass
class _Context:
    """Everything the figures share: the run, the test data and their encodings."""

    run: Any
    test: Any
    out_dir: Path
    where: str  # "fashion-mnist test split, checkpoint best (epoch 3)"
    inputs: Tensor  # (n_enc, C, H, W) model inputs in [0, 1] units
    loc: Tensor  # (n_enc, L) encoder means
    labels: Tensor | None  # (n_enc,)
    kl_per_dim: Tensor  # (L,) float64 nats
    latent_variance: Tensor  # (L,) float64
    kl_source: str

    @property
    def model(self) -> nn.Module:
        return self.run.model


@torch.no_grad()
def _encode_subset(run, test, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Model inputs (display units), encoder means and scales of the first ``n`` test images."""
    from .train import model_input, seeded_generator

    model = run.model
    family = model.likelihood
    device = next(model.parameters()).device
    inputs, locs, scales = [], [], []
    for number, start in enumerate(range(0, n, 1000)):
        index = torch.arange(start, min(start + 1000, n))
        gen = seeded_generator(run.config.eval.seed, number, _FIGURE_BINARIZE)
        x = model_input(test, index, family, gen).to(device)
        qz = model.encode(x)
        inputs.append(_unit_images(x, family).cpu())
        locs.append(qz.mean.cpu())
        scales.append(qz.base_dist.scale.cpu() if hasattr(qz, "base_dist") else qz.stddev.cpu())
    labels = test.labels[:n].cpu() if test.labels is not None else None
    return torch.cat(inputs), torch.cat(locs), torch.cat(scales), labels


def _report_stats(run, checkpoint: str) -> dict[str, Any] | None:
    """``report.json`` when it describes this checkpoint and latent size, else None."""
    path = run.directory / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    kl = report.get("kl_per_dim")
    if (
        report.get("checkpoint") != checkpoint
        or report.get("split") != "test"
        or not isinstance(kl, list)
        or len(kl) != run.model.latent_dim
    ):
        return None
    return report


def _grey_originals(cfg, test, n: int) -> Tensor | None:
    """The first ``n`` test images in grey levels when the model sees them binarised."""
    from .train import load_split

    if test.binarize == "none":
        return None
    grey_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, binarize="none"))
    grey = load_split(grey_cfg, "test")
    if grey.levels != 256 or tuple(grey.images.shape[1:]) != tuple(test.images.shape[1:]):
        return None
    return grey.images[:n].float() / 255.0


def _context(run_dir: str | Path, checkpoint: str, out_dir: str | Path | None, device) -> _Context:
    from .runs import open_run
    from .train import load_split

    run = open_run(run_dir, checkpoint, device)
    test = load_split(run.config, "test")
    if len(test) == 0:
        raise VaelabError(f"the test split of {run_dir} is empty: set data.test_limit to >= 1")
    n_enc = min(len(test), _N_SCATTER)
    inputs, loc, scale, labels = _encode_subset(run, test, n_enc)
    report = _report_stats(run, checkpoint)
    if report is not None:
        kl = torch.tensor(report["kl_per_dim"], dtype=torch.float64)
        variance = report.get("latent_variance")
        if not isinstance(variance, list) or len(variance) != kl.numel():
            variance = loc.double().var(0).tolist()
        source = f"report.json, {report.get('n_examples', '?')} test examples"
    else:
        kl = gaussian_kl_per_dim(loc, scale)
        variance = loc.double().var(0).tolist() if n_enc > 1 else [0.0] * kl.numel()
        source = f"first {n_enc} test examples"
    epoch = (run.meta.get("train_state") or {}).get("epoch", "?")
    where = f"{test.name} test split, checkpoint {checkpoint} (epoch {epoch})"
    out = Path(out_dir) if out_dir is not None else run.directory / "figures"
    return _Context(run=run, test=test, out_dir=out, where=where, inputs=inputs, loc=loc,
                    labels=labels, kl_per_dim=kl,
                    latent_variance=torch.tensor(variance, dtype=torch.float64),
                    kl_source=source)


# --------------------------------------------------------------------------- matplotlib


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas.

    pyplot is never imported: no global backend switch, no figure registry to leak
    into (the figure is freed when it goes out of scope), safe in headless runs.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Render ``fig`` to PNG, write it atomically, and release the figure's artists."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    fig.clear()
    return _write_bytes(path, buffer.getvalue())


def _show_grid(ax, grid: Tensor) -> None:
    """Draw a ``(C, H, W)`` grid in [0, 1] on ``ax`` (grey colormap for one channel)."""
    array = grid.numpy()
    if array.shape[0] == 1:
        ax.imshow(array[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(array.transpose(1, 2, 0), interpolation="nearest")


def _tile_ticks(ax, axis: str, count: int, size: int, labels: Sequence[str], every: int = 1):
    """Ticks at the centres of ``count`` tiles of ``size`` pixels along ``axis``."""
    positions = [(i + 0.5) * size for i in range(0, count, every)]
    shown = [labels[i] for i in range(0, count, every)]
    if axis == "x":
        ax.set_xticks(positions, shown)
    else:
        ax.set_yticks(positions, shown)


def _decode_means(model: nn.Module, z: Tensor) -> Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.decode(z.to(device)).mean.float().cpu().clamp(0.0, 1.0)


def _plot_reconstructions(ctx: _Context, path: Path) -> Path:
    n = min(_N_RECONSTRUCTIONS, len(ctx.inputs))
    cols = min(n, 8)
    inputs = ctx.inputs[:n]
    recon = _decode_means(ctx.model, ctx.loc[:n])
    binarised = ctx.test.binarize != "none"
    row_kinds: list[tuple[str, Tensor]] = []
    grey = _grey_originals(ctx.run.config, ctx.test, n)
    if grey is not None:
        row_kinds.append(("original\n(grey levels)", grey))
    row_kinds.append((f"model input\n({ctx.test.binarize} binarisation)" if binarised
                      else "original", inputs))
    row_kinds.append(("reconstruction\n(decoder mean)", recon))
    # interleave: for each block of `cols` examples, one row per kind
    rows, names = [], []
    for start in range(0, n, cols):
        for name, images in row_kinds:
            block = images[start:start + cols]
            if len(block) < cols:
                pad = torch.ones(cols - len(block), *block.shape[1:])
                block = torch.cat([block, pad])
            rows.append(block)
            names.append(name)
    grid = make_grid(torch.cat(rows), nrow=cols, padding=2)
    height, width = ctx.inputs.shape[-2:]
    fig = _figure(1.0 + 0.75 * cols, 0.9 + 0.75 * len(rows))
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    ax.set_yticks([2 + (i + 0.5) * (height + 2) for i in range(len(rows))], names, fontsize=8)
    ax.set_xticks([2 + (i + 0.5) * (width + 2) for i in range(cols)],
                  [str(i) for i in range(cols)], fontsize=8)
    ax.set_xlabel(f"test examples 0-{n - 1} (column = example mod {cols}); "
                  r"reconstruction decodes $z = \mathrm{E}_q[z|x]$")
    ax.set_title(f"Reconstructions: {ctx.where}", fontsize=10)
    return _save(fig, path)


def _plot_samples(ctx: _Context, path: Path) -> Path:
    from .train import _SAMPLES, seeded_generator

    seed = ctx.run.config.train.seed
    # The trainer's fixed z (same seed and purpose), so this matches figures/samples/epoch-*.png.
    z = torch.randn(_N_SAMPLES, ctx.model.latent_dim, generator=seeded_generator(seed, 0, _SAMPLES))
    means = _decode_means(ctx.model, z)
    grid = make_grid(means, nrow=8, padding=2)
    fig = _figure(6.0, 6.6)
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(rf"decoder mean of p(x|z) for {_N_SAMPLES} fixed $z \sim N(0, I)$ "
                  f"(seed {seed}, the same z as the per-epoch grids)", fontsize=8)
    ax.set_title(f"Samples from the prior\n{ctx.where.replace('test split, ', '')}",
                 fontsize=10)
    return _save(fig, path)


def _dim_label(ctx: _Context, dim: int) -> str:
    return f"$z_{{{dim}}}$ (KL {float(ctx.kl_per_dim[dim]):.2f} nats)"


def _plot_manifold(ctx: _Context, path: Path) -> Path:
    latent = ctx.model.latent_dim
    dims = top_kl_dims(ctx.kl_per_dim, 2)
    z, values = manifold_grid(latent, dims, _MANIFOLD_SIZE)
    means = _decode_means(ctx.model, z)
    n = len(values)
    grid = make_grid(means, nrow=n, padding=0)
    height, width = means.shape[-2:]
    labels = [f"{float(v):.2f}" for v in values]
    fig = _figure(7.0, 7.6 if len(dims) > 1 else 2.4)
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    _tile_ticks(ax, "x", n, width, labels, every=2)
    ax.set_xlabel(f"{_dim_label(ctx, dims[0])}, values at prior quantiles 5%..95%")
    others = "all other dimensions at 0" if latent > len(dims) else "no other dimensions"
    if len(dims) > 1:
        _tile_ticks(ax, "y", n, height, labels[::-1], every=2)
        ax.set_ylabel(f"{_dim_label(ctx, dims[1])}, values at prior quantiles 5%..95%")
        what = "the two latent dimensions with the largest KL" if latent > 2 else "both latents"
    else:
        ax.set_yticks([])
        what = "the only latent dimension"
    ax.set_title(f"Latent manifold: decoder mean over {what}\n({others}); "
                 f"{ctx.where.replace('test split, ', '')}\nKL from {ctx.kl_source}",
                 fontsize=9)
    return _save(fig, path)


def _class_names(ctx: _Context, classes: list[int]) -> list[str]:
    if ctx.test.name == "fashion-mnist" and all(0 <= c < 10 for c in classes):
        return [f"{c}: {FASHION_MNIST_CLASSES[c]}" for c in classes]
    return [f"class {c}" for c in classes]


def _plot_latent_scatter(ctx: _Context, path: Path) -> Path:
    loc = ctx.loc
    n, latent = loc.shape
    fig = _figure(7.5, 6.0)
    ax = fig.add_subplot()
    if latent == 1:
        # A strip plot: one row per class (or one row), with a fixed vertical jitter.
        jitter = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        rows = ctx.labels.double() if ctx.labels is not None else torch.zeros(n).double()
        points = torch.stack([loc[:, 0].double(), rows + 0.6 * (jitter - 0.5)], 1)
        xlabel = r"$\mathrm{E}_q[z_0|x]$ (the only latent dimension)"
        ylabel = "label (rows jittered vertically)" if ctx.labels is not None else (
            "random vertical jitter (no meaning)")
    elif latent == 2:
        points = loc.double()
        xlabel, ylabel = r"$\mathrm{E}_q[z_0|x]$", r"$\mathrm{E}_q[z_1|x]$"
    else:
        points, explained = pca_2d(loc)
        xlabel = f"principal component 1 ({100 * float(explained[0]):.1f}% of variance)"
        ylabel = f"principal component 2 ({100 * float(explained[1]):.1f}% of variance)"
    xy = points.numpy()
    if ctx.labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6, color="tab:blue", linewidths=0)
        coloured = "no labels"
    else:
        labels = ctx.labels.numpy()
        classes = sorted(int(c) for c in np.unique(labels))
        if len(classes) <= 20:
            cmap = _colormap("tab10" if len(classes) <= 10 else "tab20")
            for i, (cls, name) in enumerate(zip(classes, _class_names(ctx, classes))):
                mask = labels == cls
                ax.scatter(xy[mask, 0], xy[mask, 1], s=4, alpha=0.6, color=cmap(i),
                           linewidths=0, label=name)
            ax.legend(title="label", loc="center left", bbox_to_anchor=(1.0, 0.5),
                      markerscale=3, fontsize=8, frameon=False)
        else:
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=4, c=labels, cmap="viridis", linewidths=0)
            fig.colorbar(sc, ax=ax, label="class index")
        coloured = "coloured by label"
    projection = "" if latent <= 2 else f", PCA of {latent} dimensions"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"Encoder means of {n} test examples ({coloured}{projection})\n{ctx.where}",
                 fontsize=10)
    return _save(fig, path)


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _plot_training_curves(ctx: _Context, path: Path, records: list[dict[str, Any]]) -> Path:
    from matplotlib.ticker import MaxNLocator

    has_nelbo = any(r.get("train_nelbo") is not None for r in records)
    panels = [
        ("negative ELBO", "train_nelbo" if has_nelbo else "train_objective", "val_nelbo"),
        ("reconstruction  $-\\mathrm{E}_q \\log p(x|z)$", "train_recon", "val_recon"),
        ("KL$(q(z|x)\\,\\|\\,p(z))$", "train_kl", "val_kl"),
    ]
    train_name = "train (mean over the epoch's batches)"
    if not has_nelbo:
        train_name = "train objective (negative IWAE bound)"
    epoch = (ctx.run.meta.get("train_state") or {}).get("epoch")
    last_epoch = max(int(r["epoch"]) for r in records)
    fig = _figure(12.0, 3.8)
    axes = fig.subplots(1, 3)
    for ax, (title, train_key, val_key) in zip(axes, panels):
        xs, ys = _series(records, train_key)
        if xs:
            ax.plot(xs, ys, "o-", color="tab:blue", markersize=3, label=train_name)
        xs, ys = _series(records, val_key)
        if xs:
            ax.plot(xs, ys, "s-", color="tab:orange", markersize=3,
                    label="validation (beta = 1, end of epoch)")
        if isinstance(epoch, int):
            ax.axvline(epoch, color="grey", linestyle=":", linewidth=1,
                       label=f"checkpoint {ctx.run.checkpoint} (epoch {epoch})")
        ax.set_title(title, fontsize=10)
        if last_epoch <= 12:
            ax.set_xticks(range(1, last_epoch + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per example")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    dataset = ctx.test.name
    fig.suptitle(f"Training curves of {ctx.run.directory.name} ({dataset}; train and "
                 "validation splits)", fontsize=11)
    return _save(fig, path)


def _plot_kl_per_dim(ctx: _Context, path: Path) -> Path:
    kl = ctx.kl_per_dim
    latent = kl.numel()
    order = top_kl_dims(kl, latent)
    active = ctx.latent_variance > ACTIVE_UNIT_THRESHOLD
    values = [float(kl[j]) for j in order]
    colours = ["tab:blue" if bool(active[j]) else "tab:grey" for j in order]
    fig = _figure(max(6.0, 0.3 * latent + 2.0), 4.2)
    ax = fig.add_subplot()
    positions = list(range(latent))
    ax.bar(positions, values, color=colours)
    ax.set_xticks(positions, [f"z{j}" for j in order], rotation=90 if latent > 16 else 0,
                  fontsize=8)
    if latent <= 32:
        for x, v in zip(positions, values):
            ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", label="active: Var$_x$ E$_q[z_j]$ > 0.01"),
                       Patch(color="tab:grey", label="inactive")], fontsize=8)
    ax.set_xlabel("latent dimension, sorted by KL")
    ax.set_ylabel("KL (nats per example)")
    ax.set_title(f"KL per latent dimension: {int(active.sum())} of {latent} active units, "
                 f"total KL {float(kl.sum()):.2f} nats\n{ctx.where}\n"
                 f"KL from {ctx.kl_source}", fontsize=9)
    ax.margins(y=0.12)
    return _save(fig, path)


def _plot_traversals(ctx: _Context, path: Path) -> Path:
    latent = ctx.model.latent_dim
    dims = top_kl_dims(ctx.kl_per_dim, min(latent, _TRAVERSAL_DIMS))
    base = ctx.loc[0]
    z, values = traversal_latents(base, dims)
    means = _decode_means(ctx.model, z)
    steps = len(values)
    grid = make_grid(means, nrow=steps, padding=1)
    height, width = means.shape[-2:]
    fig = _figure(1.6 + 0.7 * steps, 1.2 + 0.7 * len(dims))
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    ax.set_xticks([1 + (i + 0.5) * (width + 1) for i in range(steps)],
                  [f"{float(v):+g}" if float(v) else "0" for v in values], fontsize=8)
    ax.set_yticks([1 + (i + 0.5) * (height + 1) for i in range(len(dims))],
                  [_dim_label(ctx, d) for d in dims], fontsize=8)
    ax.set_xlabel("value of the traversed dimension (prior standard deviations)")
    ax.set_ylabel("traversed dimension (largest KL on top)")
    ax.set_title("Latent traversals: one dimension varied, the others at "
                 r"$\mathrm{E}_q[z|x]$ of test example 0"
                 f"\n{ctx.where}", fontsize=9)
    return _save(fig, path)


def plot_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    figures: Sequence[str] | None = None,
) -> list[Path]:
    """Write the analysis figures of a run (see the module docstring) as PNG files.

    Args:
        run_dir: a vaelab run directory (checkpoints, ``metrics.jsonl``, optional
            ``report.json`` whose ``kl_per_dim`` is used when it describes ``checkpoint``;
            otherwise the KL per dimension is computed on up to 2000 test examples).
        checkpoint: ``"best"`` or ``"last"``.
        out_dir: where to write (default ``RUN_DIR/figures``); created if needed.
        device: where the model runs.
        figures: draw only these (names from :data:`FIGURES`); default all.

    Returns:
        the paths written, in the order of :data:`FIGURES`.

    Raises:
        CheckpointError: the run directory, checkpoint or ``metrics.jsonl`` is missing.
        ConfigError: an unknown figure name.
    """
    wanted = list(FIGURES) if figures is None else list(figures)
    unknown = [name for name in wanted if name not in FIGURES]
    if unknown:
        raise ConfigError(
            f"unknown figure {unknown[0]!r}: choose from {', '.join(FIGURES)}"
        )
    if not Path(run_dir).is_dir():
        raise CheckpointError(
            f"run directory {run_dir} does not exist: give the --out directory of a vaelab "
            "train run"
        )
    records = read_metrics(run_dir)
    ctx = _context(run_dir, checkpoint, out_dir, device)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    was_training = ctx.model.training
    ctx.model.eval()
    drawers = {
        "reconstructions": _plot_reconstructions,
        "samples": _plot_samples,
        "manifold": _plot_manifold,
        "latent_scatter": _plot_latent_scatter,
        "training_curves": lambda c, path: _plot_training_curves(c, path, records),
        "kl_per_dim": _plot_kl_per_dim,
        "traversals": _plot_traversals,
    }
    try:
        written = [drawers[name](ctx, ctx.out_dir / f"{name}.png")
                   for name in FIGURES if name in wanted]
    finally:
        ctx.model.train(was_training)
    return written
