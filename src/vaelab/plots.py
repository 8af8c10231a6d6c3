r"""Figures: functions of tensors that return matplotlib figures, and ``plot_run``.

Each ``*_figure`` function takes tensors (and, where it must decode, a model with
``decode(z).mean`` and ``latent_dim``) and returns a ``matplotlib.figure.Figure`` drawn by
the Agg canvas (pyplot is never imported: no global state, safe headless). Use them on any
model; :func:`save_figure` writes one as PNG. :func:`plot_run` only loads a run (its
checkpoint, test split, metrics and report) and calls them:

===========================  ==========================================================
``reconstructions.png``      :func:`reconstructions_figure`: the first 16 test examples and
                             the decoder mean at :math:`z = \mathbb{E}_q[z]`
``samples.png``              :func:`samples_figure`: decoder means for 64 fixed
                             :math:`z \sim N(0, I)` (the same ``z`` as the per-epoch grids)
``manifold.png``             :func:`manifold_figure`: decoder means on an inverse-normal-CDF
                             grid over the two latent dimensions with the largest KL, the
                             others at zero (Kingma & Welling 2014, fig. 4)
``latent_scatter.png``       :func:`latent_scatter_figure`: encoder means of up to 2000
                             test examples coloured by label (PCA beyond two dimensions)
``training_curves.png``      :func:`training_curves_figure`: train and validation NELBO,
                             reconstruction and KL per epoch
``kl_per_dim.png``           :func:`kl_per_dim_figure`: KL of each latent dimension, sorted,
                             active units marked (Burda et al. 2016: Var_x E_q[z_j] > 0.01)
``traversals.png``           :func:`traversals_figure`: one latent dimension at a time from
                             -3 to 3 prior standard deviations, dimensions ordered by KL
===========================  ==========================================================

Every figure of a run states the split, the checkpoint (and its epoch) and its units.
:func:`sample_figure` writes a bare grid of samples with Pillow (``vaelab sample``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import grids, metrics
from .data import ImageSet, Splits
from .errors import CheckpointError, ConfigError, VaelabError
from .metrics import ACTIVE_UNIT_THRESHOLD
from .rng import Purpose, seeded_generator
from .runs import open_run

__all__ = [
    "FIGURES",
    "reconstructions_figure",
    "samples_figure",
    "manifold_figure",
    "latent_scatter_figure",
    "training_curves_figure",
    "kl_per_dim_figure",
    "traversals_figure",
    "save_figure",
    "sample_figure",
    "RunFigures",
    "draw_figures",
    "read_report",
    "plot_run",
    "read_metrics",
    "top_kl_dims",
    "manifold_grid",
    "traversal_latents",
    "pca_2d",
    "pca_basis",
    "LatentPlane",
    "latent_plane",
    "scatter_points",
    "decode_means",
    "encode_images",
    "unit_images",
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

_N_RECONSTRUCTIONS = 16
_N_SCATTER = 2000
_N_SAMPLES = 64
_MANIFOLD_SIZE = 15
_TRAVERSAL_DIMS = 8
_TRAVERSAL_STEPS = 9
_DPI = 100


# --------------------------------------------------------------------------- latent helpers


def top_kl_dims(kl_per_dim: Sequence[float] | Tensor, k: int) -> list[int]:
    """Indices of the ``k`` latent dimensions with the largest KL, largest first.

    Ties keep the lower index first; ``k`` larger than ``L`` returns all ``L``.
    """
    values = torch.as_tensor(kl_per_dim, dtype=torch.float64).flatten()
    order = sorted(range(values.numel()), key=lambda j: (-float(values[j]), j))
    return order[: max(0, k)]


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


def pca_basis(points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The principal axes of ``points (N, L)``: all ``L`` of them, largest variance first.

    Uses the SVD of the centred float64 data; each axis's sign is fixed so that its
    largest-magnitude loading is positive (reproducible pictures). With fewer points than
    dimensions the axes are completed to an orthonormal basis of all ``L`` dimensions.

    Returns:
        ``centre (L,)`` (the mean), ``components (L, L)`` (orthonormal rows) and the
        fraction of the total variance along each component ``(L,)``, all float64.
    """
    points = points.double()
    centre = points.mean(0)
    centred = points - centre
    latent = points.shape[1]
    full = centred.shape[0] < latent  # then the reduced SVD has fewer than L axes
    _, singular, components = torch.linalg.svd(centred, full_matrices=full)
    index = components.abs().argmax(1)
    signs = torch.sign(components[torch.arange(components.shape[0]), index])
    components = components * signs[:, None]
    variance = torch.zeros(latent, dtype=torch.float64)
    variance[: singular.numel()] = singular[:latent] ** 2
    total = variance.sum()
    explained = variance / total if total > 0 else torch.zeros(latent, dtype=torch.float64)
    return centre, components, explained


def pca_2d(points: Tensor) -> tuple[Tensor, Tensor]:
    """Project ``points (N, L)`` on their first two principal components
    (:func:`pca_basis`).

    Returns:
        ``projected (N, 2)`` float64 and the fraction of the total variance that each of
        the two components explains ``(2,)``.
    """
    centre, components, explained = pca_basis(points)
    return (points.double() - centre) @ components[:2].T, explained[:2]


@dataclass(frozen=True)
class LatentPlane:
    r"""How ``latent_scatter.png`` (and ``vaelab explore``) place latent vectors on a plane.

    A latent ``z (L,)`` has coordinates :math:`u = (z - c) B^\top` in the orthonormal basis
    ``B`` (rows), and :math:`z = c + u B`. The plane shows ``u_0`` (x) and ``u_1`` (y);
    ``u_2 .. u_{L-1}`` are the remaining directions. With one latent dimension the plane's
    y is a vertical jitter with no latent meaning (:func:`scatter_points`).

    Attributes:
        kind: ``"latent"`` (L <= 2: the latent coordinates themselves, ``c = 0``,
            ``B = I``) or ``"pca"`` (L > 2: principal axes of the encoder means,
            :func:`pca_basis`).
        centre: ``c (L,)`` float64.
        basis: ``B (L, L)`` float64, orthonormal rows.
        explained: fraction of the encoder means' variance along each row of ``B`` ``(L,)``.
    """

    kind: str
    centre: Tensor
    basis: Tensor
    explained: Tensor

    def coordinates(self, z: Tensor) -> Tensor:
        """``u (N, L)`` float64 of latents ``z (N, L)``."""
        return (z.double() - self.centre) @ self.basis.T

    def latent(self, u: Tensor) -> Tensor:
        """``z (N, L)`` float64 at coordinates ``u (N, L)``."""
        return self.centre + u.double() @ self.basis


def latent_plane(loc: Tensor) -> LatentPlane:
    """The plane of the latent scatter for encoder means ``loc (N, L)``: the coordinates
    themselves for L <= 2, the principal axes for L > 2 (see :class:`LatentPlane`)."""
    latent = loc.shape[1]
    if latent > 2:
        centre, components, explained = pca_basis(loc)
        return LatentPlane("pca", centre, components, explained)
    loc = loc.double()
    variance = loc.var(0) if loc.shape[0] > 1 else torch.zeros(latent, dtype=torch.float64)
    total = variance.sum()
    explained = variance / total if total > 0 else torch.zeros(latent, dtype=torch.float64)
    return LatentPlane("latent", torch.zeros(latent, dtype=torch.float64),
                       torch.eye(latent, dtype=torch.float64), explained)


def scatter_points(loc: Tensor, labels: Tensor | None = None) -> tuple[LatentPlane, Tensor]:
    """The plane (:func:`latent_plane`) and the 2-D points ``(N, 2)`` float64 of the latent
    scatter: ``(u_0, u_1)``; for L = 1, ``(z_0, row + jitter)`` with one row per label (or
    one row), a fixed vertical jitter in [-0.3, 0.3)."""
    plane = latent_plane(loc)
    n, latent = loc.shape
    if latent == 1:
        jitter = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        rows = labels.double() if labels is not None else torch.zeros(n).double()
        return plane, torch.stack([loc[:, 0].double(), rows + 0.6 * (jitter - 0.5)], 1)
    if plane.kind == "latent":
        return plane, loc.double()
    return plane, (loc.double() - plane.centre) @ plane.basis[:2].T


# --------------------------------------------------------------------------- metrics


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


def save_figure(fig, path: str | Path) -> Path:
    """Render ``fig`` to PNG, write it atomically (creating the directory), and release the
    figure's artists; return the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    fig.clear()
    return grids.write_png_bytes(Path(path), buffer.getvalue())


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


def decode_means(model: nn.Module, z: Tensor) -> Tensor:
    """The decoder means ``model.decode(z).mean`` of ``z (N, L)`` as float32 on the CPU,
    clamped to [0, 1] (the images every figure shows)."""
    with torch.no_grad():
        return model.decode(z.to(metrics.model_device(model))).mean.float().cpu().clamp(0.0, 1.0)


def _dim_label(kl_per_dim: Tensor, dim: int) -> str:
    return f"$z_{{{dim}}}$ (KL {float(kl_per_dim[dim]):.2f} nats)"


def reconstructions_figure(inputs: Tensor, reconstructions: Tensor, *,
                           originals: Tensor | None = None, input_label: str = "original",
                           title: str = ""):
    """Inputs and their reconstructions, ``(N, C, H, W)`` in [0, 1] each, 8 per row; with
    ``originals`` (e.g. the grey levels behind binarised inputs) a third row per block."""
    n = len(inputs)
    cols = min(n, 8)
    row_kinds: list[tuple[str, Tensor]] = []
    if originals is not None:
        row_kinds.append(("original\n(grey levels)", originals))
    row_kinds.append((input_label, inputs))
    row_kinds.append(("reconstruction\n(decoder mean)", reconstructions))
    rows, names = [], []
    for start in range(0, n, cols):  # interleave: per block of `cols` examples, one row per kind
        for name, images in row_kinds:
            block = images[start:start + cols]
            if len(block) < cols:
                block = torch.cat([block, torch.ones(cols - len(block), *block.shape[1:])])
            rows.append(block)
            names.append(name)
    grid = grids.make_grid(torch.cat(rows), nrow=cols, padding=2)
    height, width = inputs.shape[-2:]
    fig = _figure(1.0 + 0.75 * cols, 0.9 + 0.75 * len(rows))
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    ax.set_yticks([2 + (i + 0.5) * (height + 2) for i in range(len(rows))], names, fontsize=8)
    ax.set_xticks([2 + (i + 0.5) * (width + 2) for i in range(cols)],
                  [str(i) for i in range(cols)], fontsize=8)
    ax.set_xlabel(f"test examples 0-{n - 1} (column = example mod {cols}); "
                  r"reconstruction decodes $z = \mathrm{E}_q[z|x]$")
    ax.set_title(f"Reconstructions: {title}", fontsize=10)
    return fig


def samples_figure(means: Tensor, *, caption: str = "", title: str = ""):
    """Decoder means ``(N, C, H, W)`` in [0, 1] as a grid of 8 per row."""
    fig = _figure(6.0, 6.6)
    ax = fig.add_subplot()
    _show_grid(ax, grids.make_grid(means, nrow=8, padding=2))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(caption, fontsize=8)
    ax.set_title(f"Samples from the prior\n{title}", fontsize=10)
    return fig


def manifold_figure(model: nn.Module, kl_per_dim: Tensor, *, title: str = ""):
    """Decoder means over the two latent dimensions with the largest ``kl_per_dim (L,)``
    (a row for one latent dimension), the others at 0 (see :func:`manifold_grid`)."""
    latent = model.latent_dim
    dims = top_kl_dims(kl_per_dim, 2)
    z, values = manifold_grid(latent, dims, _MANIFOLD_SIZE)
    means = decode_means(model, z)
    n = len(values)
    grid = grids.make_grid(means, nrow=n, padding=0)
    height, width = means.shape[-2:]
    labels = [f"{float(v):.2f}" for v in values]
    fig = _figure(7.0, 7.6 if len(dims) > 1 else 2.4)
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    _tile_ticks(ax, "x", n, width, labels, every=2)
    ax.set_xlabel(f"{_dim_label(kl_per_dim, dims[0])}, values at prior quantiles 5%..95%")
    others = "all other dimensions at 0" if latent > len(dims) else "no other dimensions"
    if len(dims) > 1:
        _tile_ticks(ax, "y", n, height, labels[::-1], every=2)
        ax.set_ylabel(f"{_dim_label(kl_per_dim, dims[1])}, values at prior quantiles 5%..95%")
        what = "the two latent dimensions with the largest KL" if latent > 2 else "both latents"
    else:
        ax.set_yticks([])
        what = "the only latent dimension"
    ax.set_title(f"Latent manifold: decoder mean over {what}\n({others}); {title}", fontsize=9)
    return fig


def latent_scatter_figure(loc: Tensor, labels: Tensor | None = None,
                          class_names: Sequence[str] | None = None, *, title: str = ""):
    """Encoder means ``loc (N, L)`` coloured by ``labels (N,)``: the two coordinates for
    L = 2, PCA to two for L > 2, a jittered strip for L = 1. ``class_names[c]`` names class
    ``c`` in the legend."""
    n, latent = loc.shape
    fig = _figure(7.5, 6.0)
    ax = fig.add_subplot()
    plane, points = scatter_points(loc, labels)
    if latent == 1:
        # A strip plot: one row per class (or one row), with a fixed vertical jitter.
        xlabel = r"$\mathrm{E}_q[z_0|x]$ (the only latent dimension)"
        ylabel = "label (rows jittered vertically)" if labels is not None else (
            "random vertical jitter (no meaning)")
    elif latent == 2:
        xlabel, ylabel = r"$\mathrm{E}_q[z_0|x]$", r"$\mathrm{E}_q[z_1|x]$"
    else:
        explained = plane.explained
        xlabel = f"principal component 1 ({100 * float(explained[0]):.1f}% of variance)"
        ylabel = f"principal component 2 ({100 * float(explained[1]):.1f}% of variance)"
    xy = points.numpy()
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6, color="tab:blue", linewidths=0)
        coloured = "no labels"
    else:
        values = labels.numpy()
        classes = sorted(int(c) for c in np.unique(values))
        if len(classes) <= 20:
            cmap = _colormap("tab10" if len(classes) <= 10 else "tab20")
            for i, cls in enumerate(classes):
                name = f"{cls}: {class_names[cls]}" if class_names and cls < len(class_names) \
                    else f"class {cls}"
                mask = values == cls
                ax.scatter(xy[mask, 0], xy[mask, 1], s=4, alpha=0.6, color=cmap(i),
                           linewidths=0, label=name)
            ax.legend(title="label", loc="center left", bbox_to_anchor=(1.0, 0.5),
                      markerscale=3, fontsize=8, frameon=False)
        else:
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=4, c=values, cmap="viridis", linewidths=0)
            fig.colorbar(sc, ax=ax, label="class index")
        coloured = "coloured by label"
    projection = "" if latent <= 2 else f", PCA of {latent} dimensions"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"Encoder means of {n} test examples ({coloured}{projection})\n{title}",
                 fontsize=10)
    return fig


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def training_curves_figure(records: list[dict[str, Any]], *, checkpoint: str | None = None,
                           checkpoint_epoch: int | None = None, title: str = ""):
    """Train and validation NELBO, reconstruction and KL per epoch from ``metrics.jsonl``
    records; a dotted line at ``checkpoint_epoch``."""
    from matplotlib.ticker import MaxNLocator

    has_nelbo = any(r.get("train_nelbo") is not None for r in records)
    split = "test" if any("test_nelbo" in r for r in records) else "val"
    panels = [
        ("negative ELBO", "train_nelbo" if has_nelbo else "train_objective", f"{split}_nelbo"),
        ("reconstruction  $-\\mathrm{E}_q \\log p(x|z)$", "train_recon", f"{split}_recon"),
        ("KL$(q(z|x)\\,\\|\\,p(z))$", "train_kl", f"{split}_kl"),
    ]
    train_name = "train (mean over the epoch's batches)"
    if not has_nelbo:
        train_name = "train objective (negative IWAE bound)"
    last_epoch = max(int(r["epoch"]) for r in records)
    fig = _figure(12.0, 3.8)
    axes = fig.subplots(1, 3)
    for ax, (panel, train_key, val_key) in zip(axes, panels):
        xs, ys = _series(records, train_key)
        if xs:
            ax.plot(xs, ys, "o-", color="tab:blue", markersize=3, label=train_name)
        xs, ys = _series(records, val_key)
        if xs:
            ax.plot(xs, ys, "s-", color="tab:orange", markersize=3,
                    label=f"{'test' if split == 'test' else 'validation'} (beta = 1, end of "
                          "epoch)")
        if isinstance(checkpoint_epoch, int):
            ax.axvline(checkpoint_epoch, color="grey", linestyle=":", linewidth=1,
                       label=f"checkpoint {checkpoint} (epoch {checkpoint_epoch})")
        ax.set_title(panel, fontsize=10)
        if last_epoch <= 12:
            ax.set_xticks(range(1, last_epoch + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per example")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Training curves of {title} (train and validation splits)", fontsize=11)
    return fig


def kl_per_dim_figure(kl_per_dim: Tensor, latent_variance: Tensor, *, title: str = ""):
    """Bars of ``kl_per_dim (L,)`` sorted, coloured by activity (``latent_variance (L,)`` of
    the encoder means above :data:`~vaelab.metrics.ACTIVE_UNIT_THRESHOLD`)."""
    from matplotlib.patches import Patch

    latent = kl_per_dim.numel()
    order = top_kl_dims(kl_per_dim, latent)
    active = latent_variance > ACTIVE_UNIT_THRESHOLD
    values = [float(kl_per_dim[j]) for j in order]
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
    ax.legend(handles=[Patch(color="tab:blue", label="active: Var$_x$ E$_q[z_j]$ > 0.01"),
                       Patch(color="tab:grey", label="inactive")], fontsize=8)
    ax.set_xlabel("latent dimension, sorted by KL")
    ax.set_ylabel("KL (nats per example)")
    ax.set_title(f"KL per latent dimension: {int(active.sum())} of {latent} active units, "
                 f"total KL {float(kl_per_dim.sum()):.2f} nats\n{title}", fontsize=9)
    ax.margins(y=0.12)
    return fig


def traversals_figure(model: nn.Module, base: Tensor, kl_per_dim: Tensor, *, title: str = ""):
    """Decoder means when the (up to 8) dimensions with the largest ``kl_per_dim`` are varied
    one at a time from -3 to 3, the others at ``base (L,)`` (see :func:`traversal_latents`)."""
    dims = top_kl_dims(kl_per_dim, min(model.latent_dim, _TRAVERSAL_DIMS))
    z, values = traversal_latents(base, dims)
    means = decode_means(model, z)
    steps = len(values)
    grid = grids.make_grid(means, nrow=steps, padding=1)
    height, width = means.shape[-2:]
    fig = _figure(1.6 + 0.7 * steps, 1.2 + 0.7 * len(dims))
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    ax.set_xticks([1 + (i + 0.5) * (width + 1) for i in range(steps)],
                  [f"{float(v):+g}" if float(v) else "0" for v in values], fontsize=8)
    ax.set_yticks([1 + (i + 0.5) * (height + 1) for i in range(len(dims))],
                  [_dim_label(kl_per_dim, d) for d in dims], fontsize=8)
    ax.set_xlabel("value of the traversed dimension (prior standard deviations)")
    ax.set_ylabel("traversed dimension (largest KL on top)")
    ax.set_title("Latent traversals: one dimension varied, the others at "
                 r"$\mathrm{E}_q[z|x]$ of test example 0" f"\n{title}", fontsize=9)
    return fig


# --------------------------------------------------------------------------- a run's figures


def unit_images(x: Tensor, family: nn.Module | None) -> Tensor:
    """Model inputs or samples in the data units of ``family`` (a likelihood, or None) ->
    floats in [0, 1] for display."""
    if getattr(family, "data_kind", None) == "uint8" or not x.is_floating_point():
        return x.float() / 255.0
    return x.float().clamp(0.0, 1.0)


@dataclass
class RunFigures:
    """What the figures of a run are drawn from: the objects a command already holds.

    Attributes:
        model: the model, with ``checkpoint``'s weights, in eval mode.
        test: the run's test split (:class:`~vaelab.data.ImageSet`).
        config: the run's :class:`~vaelab.config.RunConfig`.
        records: the per-epoch rows of ``metrics.jsonl``.
        checkpoint: ``"best"`` or ``"last"``; ``epoch`` the epoch it was written after.
        run_name: the run directory's name (figure titles).
        report: the test report of this checkpoint, when there is one (its KL per
            dimension is used; otherwise it is computed on up to 2000 test examples).
    """

    model: nn.Module
    test: ImageSet
    config: Any
    records: list[dict[str, Any]]
    checkpoint: str
    epoch: int | None
    run_name: str
    report: dict[str, Any] | None = None


@torch.no_grad()
def encode_images(model: nn.Module, images: ImageSet, n: int, seed: int
                  ) -> tuple[Tensor, Tensor]:
    """The first ``n`` images of ``images`` as the model sees them, and their encoder means.

    Dynamic binarisation of the images ``1000 b .. 1000 b + 999`` is drawn from
    ``seeded_generator(seed, b, Purpose.FIGURE_BINARIZE)`` (the figures use the run's
    ``eval.seed``), so every figure and ``vaelab explore`` show the same draw.

    Returns:
        model inputs ``(n, C, H, W)`` in the model's data units and ``E_q[z|x] (n, L)``,
        both on the CPU.
    """
    kind = getattr(getattr(model, "likelihood", None), "data_kind", "unit")
    device = metrics.model_device(model)
    inputs, locs = [], []
    for number, start in enumerate(range(0, n, 1000)):
        index = torch.arange(start, min(start + 1000, n))
        gen = seeded_generator(seed, number, Purpose.FIGURE_BINARIZE)
        x = images.inputs(index, kind, gen).to(device)
        inputs.append(x.cpu())
        locs.append(model.encode(x).mean.cpu())
    return torch.cat(inputs), torch.cat(locs)


def _encode_subset(run: RunFigures, n: int) -> tuple[Tensor, Tensor]:
    """Model inputs (display units) and encoder means of the first ``n`` test images."""
    inputs, loc = encode_images(run.model, run.test, n, run.config.eval.seed)
    return unit_images(inputs, getattr(run.model, "likelihood", None)), loc


def _report_stats(run: RunFigures) -> dict[str, Any] | None:
    """The report when it describes this checkpoint and latent size on the test split."""
    report = run.report
    if report is None:
        return None
    kl, variance = report.get("kl_per_dim"), report.get("latent_variance")
    if (report.get("checkpoint") != run.checkpoint or report.get("split") != "test"
            or not isinstance(kl, list) or len(kl) != run.model.latent_dim
            or not isinstance(variance, list) or len(variance) != len(kl)):
        return None
    return report


def _kl_statistics(run: RunFigures, n: int) -> tuple[Tensor, Tensor, str]:
    """KL per latent dimension and Var_x E_q[z_j] ``(L,)`` float64, and where they come from:
    the run's test report when it fits, else :func:`vaelab.metrics.elbo_metrics` on the first
    ``n`` test examples. Without a per-dimension KL (a prior that does not factorise), the
    variances rank the dimensions."""
    report = _report_stats(run)
    if report is not None:
        stats, source = report, f"report.json, {report.get('n_examples', '?')} test examples"
    else:
        stats = metrics.elbo_metrics(run.model, run.test.subset(torch.arange(n)),
                                     seed=run.config.eval.seed)
        source = f"first {n} test examples"
    variance = torch.tensor(stats["latent_variance"], dtype=torch.float64)
    if stats["kl_per_dim"] is None:
        return variance, variance, f"{source} (no per-dimension KL: ranked by Var E_q[z_j])"
    return torch.tensor(stats["kl_per_dim"], dtype=torch.float64), variance, source


def _grey_originals(test: ImageSet, n: int) -> Tensor | None:
    """The first ``n`` test images in grey levels when the model sees a draw made from them."""
    if test.binarize == "none" or test.grey is None:
        return None
    return test.grey[:n].float().cpu() / 255.0


def _class_names(test: ImageSet) -> Sequence[str] | None:
    """Label names from the data's metadata (registered datasets, class sub-folders)."""
    return test.metadata.get("classes") or None


def draw_figures(run: RunFigures, out_dir: str | Path,
                 figures: Sequence[str] | None = None) -> list[Path]:
    """Write the analysis figures of a run (see the module docstring) as PNG files into
    ``out_dir`` (created if needed); ``figures``: only these (names from :data:`FIGURES`).

    Returns:
        the paths written, in the order of :data:`FIGURES`.

    Raises:
        ConfigError: an unknown figure name. VaelabError: an empty test split.
    """
    wanted = list(FIGURES) if figures is None else list(figures)
    unknown = [name for name in wanted if name not in FIGURES]
    if unknown:
        raise ConfigError(f"unknown figure {unknown[0]!r}: choose from {', '.join(FIGURES)}")
    test = run.test
    if len(test) == 0:
        raise VaelabError(f"the test split of {run.run_name} is empty: set data.test_limit "
                          "to >= 1")
    n = min(len(test), _N_SCATTER)
    inputs, loc = _encode_subset(run, n)
    kl, variance, kl_source = _kl_statistics(run, n)
    where = f"{test.name} test split, checkpoint {run.checkpoint} (epoch {run.epoch})"
    model_where = where.replace("test split, ", "")
    seed = run.config.train.seed
    shown = min(_N_RECONSTRUCTIONS, n)
    binarised = test.binarize != "none"
    model = run.model
    # The trainer's fixed z (same seed and purpose), so samples.png matches the epoch grids.
    z_fixed = torch.randn(_N_SAMPLES, model.latent_dim,
                          generator=seeded_generator(seed, 0, Purpose.SAMPLES))
    drawers = {
        "reconstructions": lambda: reconstructions_figure(
            inputs[:shown], decode_means(model, loc[:shown]),
            originals=_grey_originals(test, shown),
            input_label=f"model input\n({test.binarize} binarisation)" if binarised
            else "original", title=where),
        "samples": lambda: samples_figure(
            decode_means(model, z_fixed), title=model_where,
            caption=rf"decoder mean of p(x|z) for {_N_SAMPLES} fixed $z \sim N(0, I)$ "
                    f"(seed {seed}, the same z as the per-epoch grids)"),
        "manifold": lambda: manifold_figure(model, kl,
                                            title=f"{model_where}\nKL from {kl_source}"),
        "latent_scatter": lambda: latent_scatter_figure(
            loc, test.labels[:n].cpu() if test.labels is not None else None,
            _class_names(test), title=where),
        "training_curves": lambda: training_curves_figure(
            run.records, checkpoint=run.checkpoint, checkpoint_epoch=run.epoch,
            title=f"{run.run_name} ({test.name})"),
        "kl_per_dim": lambda: kl_per_dim_figure(kl, variance,
                                                title=f"{where}\nKL from {kl_source}"),
        "traversals": lambda: traversals_figure(model, loc[0], kl, title=where),
    }
    out = Path(out_dir)
    return [save_figure(drawers[name](), out / f"{name}.png")
            for name in FIGURES if name in wanted]


def read_report(run_dir: str | Path) -> dict[str, Any] | None:
    """``report.json`` of a run directory, or None when it is missing or unreadable."""
    path = Path(run_dir) / "report.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def plot_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    figures: Sequence[str] | None = None,
) -> list[Path]:
    """Open a run directory and write its figures (:func:`draw_figures`), from Python
    (``vaelab plot`` opens the run once through :mod:`vaelab.experiment`).

    Args:
        run_dir: a vaelab run directory (checkpoints, ``metrics.jsonl``, optional
            ``report.json`` whose ``kl_per_dim`` is used when it describes ``checkpoint``).
        checkpoint: ``"best"`` or ``"last"``.
        out_dir: where to write (default ``RUN_DIR/figures``).
        device: where the model runs.
        figures: draw only these (names from :data:`FIGURES`); default all.

    Raises:
        CheckpointError: the run directory, checkpoint or ``metrics.jsonl`` is missing.
        ConfigError: an unknown figure name. VaelabError: an empty test split.
    """
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist: give the --out "
                              "directory of a vaelab train run")
    records = read_metrics(run_dir)
    run = open_run(run_dir, checkpoint, device)
    test = Splits(run.config.data, run.config.train.seed, device)["test"]
    figures_of = RunFigures(run.model, test, run.config, records, checkpoint, run.epoch,
                            run.directory.name, read_report(run_dir))
    return draw_figures(figures_of, out_dir if out_dir is not None else run.directory / "figures",
                        figures)


def sample_figure(
    run_dir: str | Path,
    n: int = 64,
    seed: int = 0,
    checkpoint: str = "best",
    mean: bool = False,
    out: str | Path | None = None,
) -> Path:
    """Draw ``n`` samples from the prior of a run's model into a grid PNG (Pillow).

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
    if n < 1:
        raise VaelabError(f"the number of samples must be positive, got n={n}")
    run = open_run(run_dir, checkpoint)
    model = run.model
    z = torch.randn(n, model.latent_dim, generator=seeded_generator(seed, 0, Purpose.SAMPLE_DRAW))
    with torch.no_grad():
        px = model.decode(z)
        if mean:
            images = px.mean
        else:
            images = unit_images(px.sample(generator=seeded_generator(seed, 1,
                                                                       Purpose.SAMPLE_DRAW)),
                                  getattr(model, "likelihood", None))
    if out is None:
        suffix = "-mean" if mean else ""
        out = run.directory / "figures" / f"samples-{checkpoint}-seed{seed}{suffix}.png"
    return grids.save_image_grid(images, out, nrow=grids.grid_columns(n))
