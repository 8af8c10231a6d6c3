r"""Split-level metrics: per-example values summed over a split, divided by its size.

Every number here is a sum over examples divided by the number of examples (never a mean
of batch means), accumulated in float64. The split is cut into fixed batches whose
randomness (dynamic binarisation, the ELBO's z, the importance samples) is seeded by the
batch number (:mod:`vaelab.rng`), so the numbers do not depend on how many processes share
the work: under ``torchrun`` rank ``r`` takes batches ``r, r + W, r + 2W, ...`` and the sums
are all-reduced, and 1 and N processes agree up to the order of float64 additions (about
1e-12 relative). Every rank must call these functions; an error on one rank stops all.

``data`` is any of:

- an :class:`~vaelab.data.ImageSet` (its images are served in the model's data units,
  ``model.likelihood.data_kind``, dynamically binarised per batch when the set says so);
- a tensor ``(N, *event_shape)`` already in the model's data units (cut into batches);
- an iterable of such batches (a ``DataLoader``; a ``(x, label)`` pair uses ``x``).

``model`` is anything with ``encode``, ``decode``, ``prior`` and ``latent_dim`` (see
:mod:`vaelab.objectives`).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from . import distributed, estimators, objectives, psis
from .data import ImageSet
from .data.progress import Progress
from .errors import DataError
from .options import to_plain
from .rng import Purpose, seeded_generator

__all__ = ["ACTIVE_UNIT_THRESHOLD", "PARETO_K_WARN_FRACTION", "elbo_metrics", "nll_metrics",
           "bdmc_metrics", "pareto_k_summary", "batches", "model_device", "num_examples"]

#: Burda et al. (2016): latent dimension j is active when Var_x(E_q[z_j]) > 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01

Data = ImageSet | torch.Tensor | Iterable[Any]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters, or
    one that is not an ``nn.Module``)."""
    parameters = getattr(model, "parameters", None)
    for param in (parameters() if callable(parameters) else ()):
        return param.device
    return torch.device("cpu")


def batches(data: Data, model: nn.Module, batch_size: int, seed: int,
            ctx: distributed.Context) -> Iterator[tuple[int, torch.Tensor]]:
    """This rank's ``(batch_number, x)`` pairs of ``data`` in the model's data units, on the
    model's device. An ImageSet's dynamic binarisation of batch ``n`` is drawn from
    ``seeded_generator(seed, n, Purpose.EVAL_BINARIZE)``."""
    device = model_device(model)
    if isinstance(data, ImageSet):
        kind = getattr(getattr(model, "likelihood", None), "data_kind", "unit")
        images = data.to(device) if data.device != device else data
        for number, start in enumerate(range(0, len(images), batch_size)):
            if number % ctx.world_size == ctx.rank:
                index = torch.arange(start, min(start + batch_size, len(images)), device=device)
                gen = seeded_generator(seed, number, Purpose.EVAL_BINARIZE, device=device)
                yield number, images.inputs(index, kind, gen)
        return
    if isinstance(data, torch.Tensor):
        data = data.split(batch_size)
    for number, x in enumerate(data):
        if number % ctx.world_size == ctx.rank:
            if isinstance(x, (tuple, list)):
                x = x[0]
            yield number, x.to(device)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside (dropout, batch norm), the previous mode after; nothing for a model
    that is not an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _split_sums(model: nn.Module, data: Data, batch_size: int, seed: int,
                ctx: distributed.Context | None,
                columns: Callable[[int, torch.Tensor], torch.Tensor],
                width: int, progress: str | None = None) -> tuple[int, torch.Tensor]:
    """``(n, sums)``: the number of examples and the float64 column sums ``(width,)`` of the
    per-example rows ``columns(batch_number, x) -> (B, width)`` over the whole split (all
    ranks). Runs under ``no_grad`` in eval mode. ``progress``: what is computed, in words;
    rank 0 then says so when it starts, and shows its progress with an ETA (a bar on a
    terminal, else a line every 10%).

    Raises:
        DataError: the split is empty.
    """
    ctx = ctx or distributed.Context()
    device = model_device(model)
    sums = torch.zeros(width + 1, dtype=torch.float64, device=device)
    total = num_examples(data)
    shown = Progress(total or 0, progress or "", enabled=bool(progress) and ctx.is_main
                     and total is not None, unit="example", delay=2.0)
    if shown.enabled:
        print(f"vaelab: {progress}", file=sys.stderr, flush=True)
    with torch.no_grad(), _eval_mode(model), distributed.agree(ctx, "evaluation"), shown:
        for number, x in batches(data, model, batch_size, seed, ctx):
            rows = columns(number, x).double()
            sums[0] += rows.shape[0]
            sums[1:] += rows.sum(0)
            shown.update(rows.shape[0] * ctx.world_size)
    distributed.all_reduce_sum(sums, ctx)
    n = int(sums[0])
    if n == 0:
        raise DataError("cannot evaluate an empty split: give at least one example")
    return n, sums[1:]


def num_examples(data: Data) -> int | None:
    """Examples in ``data`` (None for an iterable of batches without a length)."""
    if isinstance(data, (ImageSet, torch.Tensor)):
        return len(data)
    dataset = getattr(data, "dataset", None)  # a DataLoader
    return len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None


def _mean_stderr(total: float, total_sq: float, n: int) -> tuple[float, float]:
    """Mean and its standard error (sample variance, ddof 1) from a sum and a sum of squares."""
    mean = total / n
    variance = max(total_sq / n - mean**2, 0.0) * n / max(n - 1, 1)
    return mean, math.sqrt(variance / n)


def elbo_metrics(model: nn.Module, data: Data, *, batch_size: int = 1000, seed: int = 0,
                 ctx: distributed.Context | None = None) -> dict[str, Any]:
    """Negative ELBO (beta = 1, one z per example) over a split, with recon, KL, the KL per
    latent dimension and the active units.

    The z of batch ``n`` come from ``seeded_generator(seed, n, Purpose.EVAL_NOISE)``, so the
    numbers of successive epochs are comparable.

    Returns:
        ``n``; ``nelbo``, ``nelbo_stderr``, ``recon`` (:math:`-E_q \\log p(x|z)`), ``kl`` in nats
        per example; ``kl_per_dim`` (list of L, nats; None when q or p do not factorise);
        ``latent_variance`` (Var over the data of :math:`E_q[z_j]`, list of L) and
        ``active_units`` (how many exceed :data:`ACTIVE_UNIT_THRESHOLD`).
    """
    latent = model.latent_dim
    factorised = [True]

    def columns(number: int, x: torch.Tensor) -> torch.Tensor:
        gen = seeded_generator(seed, number, Purpose.EVAL_NOISE, device=x.device)
        q = model.encode(x)  # once: the ELBO's posterior and the active units' means
        terms = objectives.elbo_terms(model, x, num_samples=1, generator=gen, posterior=q)
        nelbo = -terms.elbo.double()
        kl_dims = terms.kl_per_dim
        if kl_dims is None:
            factorised[0] = False
            kl_dims = torch.zeros(x.shape[0], latent, device=x.device)
        loc = q.mean.double()
        return torch.cat([torch.stack([nelbo, nelbo**2, -terms.recon.double(),
                                       terms.kl.double()], 1),
                          kl_dims.double(), loc, loc**2], 1)

    n, sums = _split_sums(model, data, batch_size, seed, ctx, columns, 4 + 3 * latent)
    nelbo, nelbo_stderr = _mean_stderr(float(sums[0]), float(sums[1]), n)
    kl_dims, loc_sum, loc_sq = sums[4:].split(latent)
    loc_mean = loc_sum / n
    loc_var = (loc_sq / n - loc_mean**2).clamp_min(0) * n / max(n - 1, 1)
    return {
        "n": n,
        "nelbo": nelbo,
        "nelbo_stderr": nelbo_stderr,
        "recon": float(sums[2]) / n,
        "kl": float(sums[3]) / n,
        "kl_per_dim": (kl_dims / n).tolist() if factorised[0] else None,
        "latent_variance": loc_var.tolist(),
        "active_units": int((loc_var > ACTIVE_UNIT_THRESHOLD).sum()),
    }


def nll_metrics(model: nn.Module, data: Data, *, estimator: Any = "is", batch_size: int = 100,
                seed: int = 0, ctx: distributed.Context | None = None,
                per_example: bool = False, progress: str | None = None,
                **options: Any) -> dict[str, Any]:
    """:math:`-\\log p(x)` over a split, with the reliability of each example's estimate.

    ``estimator``: a registered name (:data:`vaelab.estimators.ESTIMATORS`: ``"is"``,
    importance sampling with ``q(z|x)``; ``"ais"``, annealed importance sampling) with its
    ``options`` (e.g. ``samples=5000``; ``steps=100, chains=32``), or an estimator built by
    :func:`vaelab.estimators.get`. Batch ``n`` draws from ``seeded_generator(seed, n,
    estimator.purpose)``.

    Returns:
        ``n``, ``nll`` and ``nll_stderr`` (over examples), ``nll_mc_stderr`` (the Monte-Carlo
        standard error of the split mean, from the per-example delta-method estimates;
        unreliable when the weights are heavy-tailed), ``iw_samples`` (K for importance
        sampling, else None), ``estimator`` (its name, options and what it reports), and
        ``pareto_k``: the summary of the examples' PSIS k-hat (:func:`pareto_k_summary`) and
        ``ess_median``; with ``per_example``, also ``per_example_nll``,
        ``per_example_pareto_k`` and ``per_example_ess``: float64 ``(n,)`` tensors in the
        order of ``data`` (for paired comparisons of two models on the same examples and
        draws).

    Raises:
        ConfigError: an unknown estimator, option or value.
    """
    est = estimators.get(estimator, **options) if isinstance(estimator, str) else estimator
    if hasattr(est, "for_model"):  # "auto": quadrature or the two-phase estimate
        est = est.for_model(model)
    ctx = ctx or distributed.Context()
    kept: list[tuple[int, torch.Tensor]] = []
    extras: list[dict[str, Any]] = []
    check = _CheckedExamples(est, data, seed, ctx, batch_size)

    def columns(number: int, x: torch.Tensor) -> torch.Tensor:
        gen = seeded_generator(seed, number, est.purpose, device=x.device)
        result = est.estimate(model, x, gen)
        if result.extras:
            extras.append(result.extras)
        nll = -result.log_likelihood.double()
        kept.append((number, torch.stack([nll, result.pareto_k, result.ess], 1).cpu()))
        check.keep(number, x, nll)
        mc_var = result.mc_stderr.double().nan_to_num(0.0) ** 2
        return torch.stack([nll, nll**2, mc_var], 1)

    n, sums = _split_sums(model, data, batch_size, seed, ctx, columns, 3, progress)
    nll, nll_stderr = _mean_stderr(float(sums[0]), float(sums[1]), n)
    gathered = distributed.all_gather_objects(kept, ctx)
    rows = torch.cat([v for _, v in sorted((item for part in gathered for item in part),
                                           key=lambda item: item[0])])
    all_extras = [e for part in distributed.all_gather_objects(extras, ctx) for e in part]
    mc = math.sqrt(float(sums[2])) / n if est.samples > 1 or est.name == "quadrature" else None
    out = {"n": n, "nll": nll, "nll_stderr": nll_stderr, "nll_mc_stderr": mc,
           "iw_samples": (est.samples if est.name in ("is", "is-refined", "is-ais", "auto")
                          else None),
           "pareto_k": pareto_k_summary(rows[:, 1], est.samples),
           "ess_median": float(rows[:, 2].nanmedian()) if rows[:, 2].isfinite().any() else None,
           "estimator": {"name": est.name, "description": est.describe(),
                         **to_plain(est.options), **est.report(all_extras)}}
    correction = check.run(model)
    if check.skipped:
        out["estimator"]["check_skipped"] = ("the AIS check needs the examples in a fixed "
                                             "order across processes (an ImageSet or tensor)")
    if correction is not None:  # the two-phase estimate: phase 1's mean, minus its bias
        out["nll"] = nll - correction["mean"]
        out["nll_mc_stderr"] = math.hypot(mc or 0.0, correction["stderr"])
        out["estimator"]["correction"] = correction
    if per_example:
        out.update(per_example_nll=rows[:, 0], per_example_pareto_k=rows[:, 1],
                   per_example_ess=rows[:, 2])
    return out


class _CheckedExamples:
    """Phase 2 of a two-phase estimate (:mod:`vaelab.estimators.two_phase`): which examples
    AIS checks, their phase-1 inputs and values as phase 1 goes by, then AIS with T and T/2
    steps on them.

    The candidates are the first ``max_check_examples`` of ``randperm(N)`` from
    ``seeded_generator(seed, Purpose.EVAL_CHECK)``, in that order: the first
    ``check_examples`` are checked, then ``batch_size`` more at a time while the correction's
    standard error is above ``check_stderr``. Group ``j`` of the order runs on rank
    ``j % W`` from ``seeded_generator(seed, j, Purpose.EVAL_CHECK, steps)`` and the decision
    to go on is taken on the gathered values, so the result does not depend on how many
    processes share the work."""

    def __init__(self, est: Any, data: Data, seed: int, ctx: distributed.Context,
                 batch_size: int) -> None:
        self.est, self.seed, self.ctx, self.batch_size = est, seed, ctx, batch_size
        self.picked: list[tuple[int, torch.Tensor, float]] = []  # (place in the order, x, nll)
        wanted = getattr(est, "check_examples", 0)
        most = max(wanted, getattr(est, "max_check_examples", 0)) if wanted else 0
        total = num_examples(data)
        fixed = isinstance(data, (ImageSet, torch.Tensor))  # batch n = rows n*size...
        self.place: dict[int, int] = {}  # example index -> its place in the random order
        if wanted and total and (fixed or ctx.world_size == 1):
            order = torch.randperm(total, generator=seeded_generator(seed, Purpose.EVAL_CHECK))
            self.place = {int(i): p for p, i in enumerate(order[:min(most, total)].tolist())}
        self.first = min(wanted, total) if total else wanted
        self.fixed, self.offset = fixed, 0
        self.skipped = bool(wanted) and not self.place

    def keep(self, number: int, x: torch.Tensor, nll: torch.Tensor) -> None:
        if not self.place:
            return
        start = number * self.batch_size if self.fixed else self.offset
        self.offset += x.shape[0]
        for i in range(x.shape[0]):
            if start + i in self.place:
                self.picked.append((self.place[start + i], x[i].detach().cpu(), float(nll[i])))

    def _groups(self, count: int) -> list[tuple[int, int]]:
        """(start, stop) of the groups in the order: the first ``check_examples`` in groups
        of ``batch_size``, then one group of ``batch_size`` per extension."""
        size, bounds = self.batch_size, []
        for start in range(0, min(self.first, count), size):
            bounds.append((start, min(start + size, self.first)))
        for start in range(self.first, count, size):
            bounds.append((start, min(start + size, count)))
        return bounds

    def run(self, model: nn.Module) -> dict[str, Any] | None:
        if not self.place:
            return None
        ctx = self.ctx
        picked = sorted((item for part in distributed.all_gather_objects(self.picked, ctx)
                         for item in part), key=lambda item: item[0])
        groups = self._groups(len(picked))
        device = model_device(model)
        values: dict[int, torch.Tensor] = {}
        done, stop = 0, sum(1 for start, _ in groups if start < self.first)
        with _eval_mode(model), distributed.agree(ctx, "evaluation"):
            while True:
                mine = []
                for j in range(done, stop):
                    if j % ctx.world_size != ctx.rank:
                        continue
                    lo, hi = groups[j]
                    x = torch.stack([row for _, row, _ in picked[lo:hi]]).to(device)
                    both = []
                    for ais in (self.est.check, self.est.check_half):
                        gen = seeded_generator(self.seed, j, Purpose.EVAL_CHECK,
                                               ais.options.steps, device=device)
                        both.append(-ais.estimate(model, x, gen).log_likelihood.double().cpu())
                    mine.append((j, torch.stack(both, 1)))
                values.update(item for part in distributed.all_gather_objects(mine, ctx)
                              for item in part)
                ais = torch.cat([values[j] for j in range(stop)])
                count = ais.shape[0]
                first = torch.tensor([value for _, _, value in picked[:count]],
                                     dtype=torch.float64)
                result = self.est.correction(first, ais[:, 0], ais[:, 1])
                if stop == len(groups) or result["stderr"] <= self.est.check_stderr:
                    return result
                done, stop = stop, stop + 1


#: Share of examples with k-hat above the threshold beyond which the report warns.
PARETO_K_WARN_FRACTION = 0.01


def pareto_k_summary(pareto_k: torch.Tensor, num_samples: int) -> dict[str, Any]:
    """Median, maximum and share of unreliable estimates among the examples' k-hat.

    ``above`` counts k-hat > :func:`vaelab.psis.pareto_k_threshold` (0.7 from K = 2155;
    ``inf`` counts as above, ``-inf``, constant weights, as below); ``not_estimated``
    counts the ``nan`` values (K < 25, or an unusable estimate). ``warn`` is True when
    more than :data:`PARETO_K_WARN_FRACTION` of the estimated examples are above.
    """
    threshold = psis.pareto_k_threshold(num_samples)
    estimated = pareto_k[~torch.isnan(pareto_k)]
    if estimated.numel() == 0:
        return {"threshold": None, "median": None, "max": None, "fraction_above": None,
                "not_estimated": int(pareto_k.numel()), "warn": False}
    fraction = float((estimated > threshold).double().mean())
    return {"threshold": threshold, "median": float(estimated.median()),
            "max": float(estimated.max()), "fraction_above": fraction,
            "not_estimated": int(pareto_k.numel() - estimated.numel()),
            "warn": fraction > PARETO_K_WARN_FRACTION}


def bdmc_metrics(model: nn.Module, num_examples: int, *, steps: int, chains: int,
                 batch_size: int = 100, seed: int = 0,
                 ctx: distributed.Context | None = None) -> dict[str, Any]:
    """Bidirectional Monte Carlo (:func:`vaelab.estimators.bdmc`) on ``num_examples`` examples
    simulated from the model, in batches of ``batch_size`` (batch ``n`` from
    ``seeded_generator(seed, n, Purpose.EVAL_BDMC)``; shared over ranks like the others).

    Returns:
        ``n``; ``lower`` and ``upper``: the mean stochastic lower and upper bounds of
        :math:`\\log p(x)` (nats per example); ``gap`` (upper - lower) and ``gap_stderr``
        over examples: how far AIS with these settings can be from the truth on data like
        the model's; ``steps``, ``chains``.
    """
    ctx = ctx or distributed.Context()
    sizes = [min(batch_size, num_examples - start) for start in range(0, num_examples, batch_size)]
    sums = torch.zeros(4, dtype=torch.float64)
    with _eval_mode(model), distributed.agree(ctx, "evaluation"):
        for number, size in enumerate(sizes):
            if number % ctx.world_size != ctx.rank:
                continue
            gen = seeded_generator(seed, number, Purpose.EVAL_BDMC, device=model_device(model))
            result = estimators.bdmc(model, size, steps=steps, chains=chains, generator=gen)
            gap = result.gap.double().cpu()
            sums += torch.stack([result.lower.double().sum().cpu(),
                                 result.upper.double().sum().cpu(), gap.sum(), (gap**2).sum()])
    sums = distributed.all_reduce_sum(sums.to(model_device(model)), ctx).cpu()
    gap, gap_stderr = _mean_stderr(float(sums[2]), float(sums[3]), num_examples)
    return {"n": num_examples, "lower": float(sums[0]) / num_examples,
            "upper": float(sums[1]) / num_examples, "gap": gap, "gap_stderr": gap_stderr,
            "steps": steps, "chains": chains}
