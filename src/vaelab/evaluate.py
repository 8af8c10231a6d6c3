"""Split-level metrics and the evaluation report.

Every split-level number is a sum over examples divided by the number of
examples (never a mean of batch means). Work is split into fixed batches whose
randomness is seeded by the batch number, so the numbers do not depend on how
many processes share the work: under ``torchrun`` rank ``r`` takes batches
``r, r + W, r + 2W, ...`` and the float64 sums are all-reduced. Each batch gets the
same inputs and draws whichever rank computes it, so 1 and N processes agree up to
the order of float64 additions (about 1e-12 relative). Every rank must call the
distributed functions; an error on one rank stops all of them (no hang).

Report fields (``report.json``; nats per example unless stated):

========================  ===========================================================
``nelbo``, ``nelbo_stderr``  negative ELBO (beta = 1, one z sample per example) and the
                          standard error of its split mean
``recon``, ``kl``         -E_q log p(x|z) and KL(q(z|x) || p(z)), so ``nelbo = recon + kl``
``nll``, ``nll_stderr``   -log p(x) by importance sampling with ``iw_samples`` samples
                          (None, with ``nll_unavailable``, when the likelihood is not
                          normalised for the data)
``gap``                   ``nelbo - nll``: an estimate of E KL(q(z|x) || p(z|x))
``bits_per_dim``          ``nll`` (or ``nelbo`` when there is no ``nll``) in bits per dimension
``active_units``          latent dims with Var_x(E_q[z_j]) > 0.01 (Burda et al. 2016)
``kl_per_dim``            average KL of each latent dimension
========================  ===========================================================
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed

__all__ = ["elbo_metrics", "evaluate", "write_report", "format_table", "ACTIVE_UNIT_THRESHOLD"]

ACTIVE_UNIT_THRESHOLD = 0.01
_EVAL_NOISE, _EVAL_BINARIZE, _EVAL_IW = 11, 12, 13


def _batches(n: int, batch_size: int, ctx: distributed.Context):
    """This rank's ``(batch_number, index)`` pairs over ``n`` examples."""
    for number, start in enumerate(range(0, n, batch_size)):
        if number % ctx.world_size == ctx.rank:
            yield number, torch.arange(start, min(start + batch_size, n))


def _inputs(model: nn.Module, images, index: torch.Tensor, seed: int, number: int):
    from .train import model_input, seeded_generator

    device = images.images.device
    gen = seeded_generator(seed, number, _EVAL_BINARIZE, device=device)
    return model_input(images, index.to(device), model.likelihood, gen)


@torch.no_grad()
def elbo_metrics(
    model: nn.Module,
    images,
    *,
    batch_size: int = 1000,
    seed: int = 0,
    ctx: distributed.Context | None = None,
) -> dict[str, Any]:
    """Negative ELBO (beta = 1) over a split, with recon, KL, per-dim KL and active units.

    Returns a dict with ``n``, ``nelbo``, ``nelbo_stderr``, ``recon``, ``kl`` (nats per
    example), ``kl_per_dim`` (list, nats), ``active_units`` (int) and ``latent_variance``
    (Var over the data of E_q[z_j], list).

    ``ctx``: share the batches over the ranks of a process group (every rank calls this
    with the same arguments and gets the same numbers); None: this process alone.
    """
    from . import objectives
    from .train import seeded_generator

    ctx = ctx or distributed.Context()
    was_training = model.training
    model.eval()
    device = images.images.device
    latent = model.latent_dim
    # n, sum nelbo, sum nelbo^2, sum recon, sum kl, sum kl_j (L), sum mu_j (L), sum mu_j^2 (L)
    sums = torch.zeros(5 + 3 * latent, dtype=torch.float64, device=device)
    with distributed.agree(ctx, "evaluation"):
        for number, index in _batches(len(images), batch_size, ctx):
            x = _inputs(model, images, index, seed, number)
            gen = seeded_generator(seed, number, _EVAL_NOISE, device=device)
            terms = objectives.elbo_terms(model, x, num_samples=1, generator=gen)
            nelbo = (-terms.elbo).double()
            loc = model.encode(x).mean.double()
            sums[0] += nelbo.numel()
            sums[1] += nelbo.sum()
            sums[2] += (nelbo**2).sum()
            sums[3] += (-terms.recon).double().sum()
            sums[4] += terms.kl.double().sum()
            if terms.kl_per_dim is not None:
                sums[5:5 + latent] += terms.kl_per_dim.double().sum(0)
            sums[5 + latent:5 + 2 * latent] += loc.sum(0)
            sums[5 + 2 * latent:] += (loc**2).sum(0)
    distributed.all_reduce_sum(sums, ctx)
    model.train(was_training)
    n = float(sums[0])
    if n == 0:
        raise ValueError("cannot evaluate an empty split")
    mean = float(sums[1]) / n
    variance = max(float(sums[2]) / n - mean**2, 0.0) * n / max(n - 1, 1)
    loc_mean = sums[5 + latent:5 + 2 * latent] / n
    loc_var = (sums[5 + 2 * latent:] / n - loc_mean**2).clamp_min(0) * n / max(n - 1, 1)
    return {
        "n": int(n),
        "nelbo": mean,
        "nelbo_stderr": math.sqrt(variance / n),
        "recon": float(sums[3]) / n,
        "kl": float(sums[4]) / n,
        "kl_per_dim": (sums[5:5 + latent] / n).tolist(),
        "latent_variance": loc_var.tolist(),
        "active_units": int((loc_var > ACTIVE_UNIT_THRESHOLD).sum()),
    }


@torch.no_grad()
def nll_metrics(
    model: nn.Module,
    images,
    *,
    iw_samples: int,
    batch_size: int = 100,
    seed: int = 0,
    ctx: distributed.Context | None = None,
) -> dict[str, Any]:
    """Importance-sampled -log p(x) over a split: ``nll`` and ``nll_stderr`` (nats).

    ``ctx`` as in :func:`elbo_metrics`: the batches are shared over its ranks.
    """
    from . import objectives
    from .train import seeded_generator

    ctx = ctx or distributed.Context()
    was_training = model.training
    model.eval()
    device = images.images.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with distributed.agree(ctx, "evaluation"):
        for number, index in _batches(len(images), batch_size, ctx):
            x = _inputs(model, images, index, seed, number)
            gen = seeded_generator(seed, number, _EVAL_IW, device=device)
            result = objectives.log_likelihood(model, x, num_samples=iw_samples, generator=gen)
            nll = -result.per_example.double()
            sums += torch.stack([torch.tensor(float(nll.numel()), dtype=torch.float64,
                                              device=device), nll.sum(), (nll**2).sum()])
    distributed.all_reduce_sum(sums, ctx)
    model.train(was_training)
    n = float(sums[0])
    if n == 0:
        raise ValueError("cannot evaluate an empty split")
    mean = float(sums[1]) / n
    variance = max(float(sums[2]) / n - mean**2, 0.0) * n / max(n - 1, 1)
    return {"n": int(n), "nll": mean, "nll_stderr": math.sqrt(variance / n)}


def evaluate(
    model: nn.Module,
    images,
    cfg,
    *,
    checkpoint_name: str = "best",
    iw_samples: int = 1000,
    batch_size: int = 100,
    seed: int = 0,
    ctx: distributed.Context | None = None,
) -> dict[str, Any]:
    """The full report for ``model`` on the split ``images`` (see the module docstring).

    ``ctx``: how the work is shared. None joins the process group when the program was
    launched by ``torchrun`` (``WORLD_SIZE`` > 1; every rank must then call this, and
    all get the same report), else evaluates in this process. Pass
    ``distributed.Context()`` to evaluate in this process alone under torchrun.
    """
    from . import objectives

    if ctx is None:
        ctx = distributed.setup(images.images.device)

    family = model.likelihood
    dims = int(np.prod(images.images.shape[1:]))
    elbo = elbo_metrics(model, images, batch_size=max(batch_size, 500), seed=seed, ctx=ctx)
    eight_bit_density = family.data_kind == "unit" and images.levels == 256
    report: dict[str, Any] = {
        "dataset": images.name,
        "split": images.split,
        "n_examples": elbo["n"],
        "likelihood": family.name,
        "likelihood_options": family.config(),
        "normalized": bool(family.normalized),
        "binarization": _binarization(images),
        "data_levels": images.levels,
        "checkpoint": checkpoint_name,
        "nelbo": elbo["nelbo"],
        "nelbo_stderr": elbo["nelbo_stderr"],
        "recon": elbo["recon"],
        "kl": elbo["kl"],
        "nll": None,
        "nll_stderr": None,
        "iw_samples": iw_samples,
        "gap": None,
        "bits_per_dim": None,
        "bits_per_dim_of": None,
        "active_units": elbo["active_units"],
        "latent_dim": model.latent_dim,
        "kl_per_dim": elbo["kl_per_dim"],
        "latent_variance": elbo["latent_variance"],
        "data_dims": dims,
        "units": "nats per example",
        "seed": seed,
    }
    if family.normalized:
        nll = nll_metrics(model, images, iw_samples=iw_samples, batch_size=batch_size,
                          seed=seed, ctx=ctx)
        report.update(nll=nll["nll"], nll_stderr=nll["nll_stderr"],
                      gap=elbo["nelbo"] - nll["nll"])
        report["bits_per_dim"] = objectives.bits_per_dim(
            nll["nll"], dims, eight_bit_density=eight_bit_density)
        report["bits_per_dim_of"] = "nll"
    else:
        report["nll_unavailable"] = (
            f"{family.name} with unnormalized=True is not a normalised likelihood for "
            "grey-level data (BCE on grey levels), so no NLL or bits/dim is claimed; "
            "nelbo is the training objective's value, not a bound on -log p(x)"
        )
    if eight_bit_density:
        report["note"] = (
            "a density on [0,1] scored on 8-bit data; bits_per_dim includes the "
            "D ln 256 correction to the discrete scale"
        )
    return report


def _binarization(images) -> str:
    """How the evaluated pixels were binarised, in words a reader of the report needs."""
    info = images.metadata.get("binarization") or {}
    if info.get("requested") == "dynamic" and images.binarize == "static":
        return f"dynamic (this split binarised once with the fixed seed {info.get('seed', 0)})"
    if images.binarize == "dynamic":
        return "dynamic (a fresh draw per evaluation batch, seeded by the batch number)"
    return images.binarize


def write_report(result: dict[str, Any], run_dir: str | Path, stem: str = "report") -> None:
    """Write ``report.json`` and ``report.md`` into ``run_dir`` (atomically)."""
    from ._io import atomic_write_text

    run_dir = Path(run_dir)
    atomic_write_text(run_dir / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(run_dir / f"{stem}.md", format_markdown(result))


def _fmt(value: Any, stderr: Any = None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:.3f}"
        return f"{text} ± {stderr:.3f}" if stderr is not None else text
    return str(value)


def _rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("dataset / split", f"{result['dataset']} / {result['split']} "
                            f"({result['n_examples']} examples)"),
        ("likelihood", f"{result['likelihood']} {result.get('likelihood_options') or ''}".strip()
         + ("" if result["normalized"] else " (NOT normalised: not a likelihood)")),
        ("binarization", str(result["binarization"])),
        ("checkpoint", str(result["checkpoint"])),
        ("NELBO (nats)", _fmt(result["nelbo"], result["nelbo_stderr"])),
        ("  reconstruction", _fmt(result["recon"])),
        ("  KL", _fmt(result["kl"])),
        (f"NLL (nats, K={result['iw_samples']})", _fmt(result["nll"], result["nll_stderr"])
         if result["nll"] is not None else "n/a: " + result.get("nll_unavailable", "")),
        ("gap NELBO - NLL", _fmt(result["gap"])),
        ("bits/dim", _fmt(result["bits_per_dim"])),
        ("active units", f"{result['active_units']} of {result['latent_dim']}"),
    ]
    return rows


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table for the terminal."""
    rows = _rows(result)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def format_markdown(result: dict[str, Any]) -> str:
    lines = ["# vaelab evaluation report", "", "| quantity | value |", "| --- | --- |"]
    lines += [f"| {k.strip()} | {v} |" for k, v in _rows(result)]
    lines += ["", "Values are nats per example, ± one standard error of the split mean.",
              "NELBO uses beta = 1 whatever the training objective was."]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    kl = result.get("kl_per_dim") or []
    if kl:
        order = sorted(range(len(kl)), key=lambda j: -kl[j])
        lines += ["", "KL per latent dimension (nats), largest first: "
                  + ", ".join(f"z{j}={kl[j]:.3f}" for j in order)]
    return "\n".join(lines) + "\n"
