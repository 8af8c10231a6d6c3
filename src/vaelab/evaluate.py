"""The evaluation report of a model on a split: what papers report, stated honestly.

:func:`evaluate` reports on any model and data (see :mod:`vaelab.metrics`);
:func:`evaluate_run` opens a run directory, loads a split of its dataset and reports on its
``best`` or ``last`` checkpoint (``vaelab eval``, and the end of ``vaelab train``).

Report fields (``report.json``; nats per example unless stated):

========================  ===========================================================
``nelbo``, ``nelbo_stderr``  negative ELBO (beta = 1, one z sample per example) and the
                          standard error of its split mean
``recon``, ``kl``         -E_q log p(x|z) and KL(q(z|x) || p(z)), so ``nelbo = recon + kl``
``nll``, ``nll_stderr``   -log p(x) by importance sampling with ``iw_samples`` samples
                          (None, with ``nll_unavailable``, when the likelihood is not
                          normalised for the data)
``nll_mc_stderr``         Monte-Carlo standard error of ``nll`` (delta method)
``gap``                   ``nelbo - nll``: an estimate of E KL(q(z|x) || p(z|x))
``bits_per_dim``          ``nll`` (or ``nelbo`` when there is no ``nll``) in bits per dimension
``active_units``          latent dims with Var_x(E_q[z_j]) > 0.01 (Burda et al. 2016)
``kl_per_dim``            average KL of each latent dimension
``checkpoint``, ``checkpoint_epoch``, ``model_selection``  which weights, and why
``training_precision``    the arithmetic that trained them (``train.precision``: fp32,
                          bf16 or fp16); the report itself is always computed in float32
``trained_with``          weights another framework trained (``vaelab.keras.save_run``):
                          it, instead of a preset and a precision
========================  ===========================================================
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import config, distributed, estimators, metrics, objectives, runs, runtime
from ._io import atomic_write_text
from .data import ImageSet, Splits

__all__ = ["evaluate", "evaluate_run", "run_fields", "verdict", "estimate_seconds",
           "write_report", "format_table", "format_markdown"]


def evaluate(
    model: nn.Module,
    data: metrics.Data,
    *,
    estimator: Any = "is",
    iw_samples: int | None = None,
    batch_size: int = 100,
    seed: int = 0,
    checkpoint_name: str | None = None,
    ctx: distributed.Context | None = None,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """The full report for ``model`` on the split ``data`` (see the module docstring).

    ``estimator``: how ``nll`` is estimated: a registered name
    (:data:`vaelab.estimators.ESTIMATORS`; ``"is"``, importance sampling with ``q(z|x)``, the
    default; ``"ais"``, annealed importance sampling) with its ``options`` (``samples=5000``;
    ``steps=100, chains=32``), or an estimator from :func:`vaelab.estimators.get`.
    ``iw_samples=K`` is short for ``estimator="is", samples=K``.

    ``progress``: say what the log-likelihood estimate computes and show its progress with
    an ETA on standard error (rank 0).

    ``data``: an :class:`~vaelab.data.ImageSet`, a tensor of inputs in the model's data
    units, or an iterable of such batches (see :mod:`vaelab.metrics`).

    ``ctx``: how the work is shared. None joins the process group when the program was
    launched by ``torchrun`` (``WORLD_SIZE`` > 1; every rank must then call this, and
    all get the same report), else evaluates in this process. Pass
    ``distributed.Context()`` to evaluate in this process alone under torchrun.

    Raises:
        ConfigError: an unknown estimator, option or value.
    """
    if iw_samples is not None:
        options["samples"] = iw_samples
    est = estimators.get(estimator, **options) if isinstance(estimator, str) else estimator
    if hasattr(est, "for_model"):  # "auto": what this model gets, said before it runs
        est = est.for_model(model)
    if ctx is None:
        ctx = distributed.setup(metrics.model_device(model))
    family = getattr(model, "likelihood", None)
    normalized = bool(getattr(family, "normalized", True))
    elbo = metrics.elbo_metrics(model, data, batch_size=max(batch_size, 500), seed=seed, ctx=ctx)
    source = _describe_data(data)
    dims = source.pop("data_dims")
    eight_bit_density = getattr(family, "data_kind", None) == "unit" and source["data_levels"] == 256
    report: dict[str, Any] = {
        **source,
        "n_examples": elbo["n"],
        "likelihood": getattr(family, "name", type(family).__name__ if family else "unknown"),
        "likelihood_options": family.config() if hasattr(family, "config") else {},
        "normalized": normalized,
        "checkpoint": checkpoint_name,
        "nelbo": elbo["nelbo"],
        "nelbo_stderr": elbo["nelbo_stderr"],
        "recon": elbo["recon"],
        "kl": elbo["kl"],
        "nll": None,
        "nll_stderr": None,
        "nll_mc_stderr": None,
        "iw_samples": est.samples if est.name == "is" else None,
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
        "warnings": [],
    }
    if normalized:
        label = (f"estimating -log p(x) on {report['dataset']} {report['split']} "
                 f"({elbo['n']:,} examples, {est.describe()})")
        nll = metrics.nll_metrics(model, data, estimator=est, batch_size=batch_size,
                                  seed=seed, ctx=ctx, progress=label if progress else None)
        report.update(nll=nll["nll"], nll_stderr=nll["nll_stderr"],
                      nll_mc_stderr=nll["nll_mc_stderr"], gap=elbo["nelbo"] - nll["nll"],
                      estimator=nll["estimator"], pareto_k=nll["pareto_k"],
                      ess_median=nll["ess_median"])
        if nll["pareto_k"]["warn"] and "correction" not in nll["estimator"]:
            report["warnings"].append(_pareto_warning(nll["pareto_k"], est.name))
        report["bits_per_dim"] = objectives.bits_per_dim(
            nll["nll"], dims, eight_bit_density=eight_bit_density)
        report["bits_per_dim_of"] = "nll"
    else:
        report["nll_unavailable"] = (
            f"{report['likelihood']} with unnormalized=True is not a normalised likelihood for "
            "grey-level data (BCE on grey levels), so no NLL or bits/dim is claimed; "
            "nelbo is the training objective's value, not a bound on -log p(x)"
        )
    report["verdict"] = verdict(report)
    if eight_bit_density:
        report["note"] = (
            "a density on [0,1] scored on 8-bit data; bits_per_dim includes the "
            "D ln 256 correction to the discrete scale"
        )
    return report


def run_fields(cfg: config.RunConfig, checkpoint: str, epoch: int | None,
               trained_with: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a report of a run adds: which checkpoint's epoch, how it was selected, the
    precision that trained it, and the preset with the source it follows; for weights
    another framework trained (``trained_with`` of the checkpoint's meta, e.g. from
    :func:`vaelab.keras.save_run`) that framework instead of a preset and a precision
    vaelab cannot know."""
    if trained_with:
        return {"checkpoint_epoch": epoch, "model_selection": "the weights as saved",
                "training_precision": None, "preset": None, "preset_source": None,
                "trained_with": dict(trained_with)}
    selection = ("lowest validation NELBO (beta = 1) over the epochs" if checkpoint == "best"
                 and cfg.train.select == "best" and cfg.train.validation_split == "validation"
                 and cfg.data.validation_size else "the last epoch")
    preset = cfg.preset or "default"
    return {"checkpoint_epoch": epoch, "model_selection": selection,
            "training_precision": cfg.train.precision, "preset": preset,
            "preset_source": config.PRESET_SOURCES.get(preset)}


#: The verdict says *converged* when the two-phase correction's standard error is within
#: this (nats), and AIS's drift (its value with half the steps minus its value) too, or
#: within :data:`DRIFT_NATS` when the drift is extrapolated away.
CONVERGED_NATS = 0.05

#: The largest drift the 1/T extrapolation of AIS is trusted to remove (nats).
DRIFT_NATS = 0.2


def verdict(report: dict[str, Any]) -> dict[str, str]:
    """Whether the report's NLL is converged and how vaelab knows: ``{"status", "text"}``,
    ``status`` one of ``exact``, ``converged``, ``uncertain``, ``not verified``,
    ``unreliable``, ``no nll``; ``text`` one line that says why (the report prints it)."""
    if report.get("nll") is None:
        return {"status": "no nll", "text": "no NLL is claimed: the likelihood is not "
                "normalised for this data"}
    est = report.get("estimator") or {}
    name, k = est.get("name"), report.get("pareto_k") or {}
    if name == "quadrature":
        if est.get("unconverged"):
            return {"status": "not verified", "text": f"quadrature did not converge on "
                    f"{est['unconverged']} examples (largest change {est['largest_change']:.2g} "
                    "nats): raise eval.quadrature.max_points"}
        return {"status": "exact", "text": f"exact: quadrature over the {report['latent_dim']}"
                f"-D latent space, to {est['tolerance']:g} nats (the last refinements agree to "
                f"{est['largest_change']:.1g} nats or better)"}
    correction = est.get("correction")
    if correction is not None:
        return _two_phase_verdict(est, correction)
    if est.get("check_skipped"):
        return {"status": "not verified", "text": f"not verified: {est['check_skipped']}"}
    if name == "ais":
        return {"status": "not verified", "text": f"not verified: AIS with {est['steps']} "
                "steps; check by doubling --ais-steps or by BDMC (--bdmc N)"}
    if k.get("fraction_above") is None:
        return {"status": "not verified", "text": "not verified: too few importance samples "
                "for a Pareto k-hat (K < 25)"}
    share = 100 * k["fraction_above"]
    if not k.get("warn"):
        return {"status": "converged", "text": f"converged: the importance weights have a "
                f"Pareto k-hat below {k['threshold']:.2f} on {100 - share:.1f}% of the "
                "examples (finite variance)"}
    return {"status": "unreliable", "text": f"unreliable: the importance weights have a Pareto "
            f"k-hat above {k['threshold']:.2f} on {share:.1f}% of the examples: the NLL is "
            "likely too high by an unknown amount; use the default estimator (auto)"}


def _two_phase_verdict(est: dict[str, Any], correction: dict[str, Any]) -> dict[str, str]:
    c, se = correction["mean"], correction["stderr"]
    ais, drift = correction["ais"], correction["drift"]
    extrapolated = correction.get("extrapolated", False)
    how = (f"extrapolated in 1/T from {drift['steps']} and {ais['steps']} steps x "
           f"{ais['chains']} chains, which removed {drift['mean']:+.3f} ± "
           f"{drift['stderr']:.3f} of AIS's own bias" if extrapolated else
           f"{ais['steps']} steps x {ais['chains']} chains; with {drift['steps']} steps it "
           f"differs by {drift['mean']:+.3f} ± {drift['stderr']:.3f}")
    what = (f"importance sampling (K = {est['samples']}) corrected by {-c:+.3f} ± {se:.3f} "
            f"nats, its bias measured by AIS on {correction['examples']} random examples "
            f"({how})")
    if se > CONVERGED_NATS:
        more = (f"eval.{est['name']}.budget_gflop and max_check_examples: the decoder's cost "
                "limited the check" if est.get("scaled_for") else
                f"eval.{est['name']}.max_check_examples")
        return {"status": "uncertain", "text": f"uncertain: {what}; check more examples "
                f"({more})"}
    if abs(drift["mean"]) > (DRIFT_NATS if extrapolated else CONVERGED_NATS):
        return {"status": "uncertain", "text": f"uncertain: {what}; AIS has not converged: "
                f"raise eval.{est['name']}.check_steps"}
    return {"status": "converged", "text": f"converged: {what}"}


def _pareto_warning(summary: dict[str, Any], estimator: str) -> str:
    share = 100 * summary["fraction_above"]
    if estimator in ("is", "is-refined"):
        what, fix = "importance weights", ("use more samples (--iw-samples), a better "
                                           "encoder, or AIS (--estimator ais)")
    else:
        what, fix = "AIS weights", "use more annealing steps (--ais-steps) or chains"
    return (f"{share:.1f}% of the examples have a Pareto k-hat above "
            f"{summary['threshold']:.2f} (max {summary['max']:.2f}): their {what} are too "
            "heavy-tailed for the estimate to be reliable, so the NLL is likely too high and "
            f"its standard error too small; {fix}")


def estimate_seconds(model: nn.Module, data: metrics.Data, *, estimator: Any = "is",
                     batch_size: int = 100, **options: Any) -> float:
    """Roughly how long :func:`evaluate` takes on ``data`` with ``estimator``: one chunk of
    decoder passes on one batch is timed (after a warm-up call) and scaled to every example
    and the estimator's decoder passes per example (its ``cost``); the ELBO pass is small
    beside it. Seconds, in this process."""
    est = estimators.get(estimator, **options) if isinstance(estimator, str) else estimator
    if hasattr(est, "for_model"):
        est = est.for_model(model)
    x = next(metrics.batches(data, model, batch_size, 0, distributed.Context()))[1]
    samples = objectives.default_chunk(model, x, 1000)
    gen = torch.Generator(device=x.device).manual_seed(0)
    with torch.no_grad():
        model.eval()
        objectives.log_likelihood(model, x, num_samples=samples, generator=gen)
        started = time.perf_counter()
        objectives.log_likelihood(model, x, num_samples=samples, generator=gen)
        per_decode = (time.perf_counter() - started) / (samples * x.shape[0])
    examples = metrics.num_examples(data)
    cost = est.cost_for(examples) if hasattr(est, "cost_for") else est.cost
    return per_decode * cost * examples


def _describe_data(data: metrics.Data) -> dict[str, Any]:
    """dataset, split, binarization, data_levels and data_dims of what is evaluated."""
    if isinstance(data, ImageSet):
        return {"dataset": data.name, "split": data.split, "binarization": _binarization(data),
                "data_levels": data.levels, "data_dims": int(torch.tensor(data.event_shape).prod())}
    if isinstance(data, torch.Tensor):
        dims = int(torch.tensor(data.shape[1:]).prod())
        return {"dataset": "tensor", "split": "given", "binarization": "as given",
                "data_levels": None, "data_dims": dims}
    first = next(iter(data))
    first = first[0] if isinstance(first, (tuple, list)) else first
    return {"dataset": "batches", "split": "given", "binarization": "as given",
            "data_levels": None, "data_dims": int(torch.tensor(first.shape[1:]).prod())}


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    checkpoint: str = "best",
    estimator: str | None = None,
    iw_samples: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    limit: int | None = None,
    data_dir: str | None = None,
    device: torch.device | str = "auto",
    ctx: distributed.Context | None = None,
    bdmc_examples: int | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """The report of the run in ``run_dir`` on one split of its dataset (from Python; ``vaelab
    eval`` opens the run once through :mod:`vaelab.experiment` and reports the same).

    Defaults come from the run's ``[eval]`` section: the estimator and its options
    (``options`` override them, e.g. ``samples=5000``; ``iw_samples=K`` is short for
    ``estimator="is", samples=K``), ``batch_size``, ``seed``.
    ``limit`` evaluates the first N examples; ``data_dir`` overrides where the dataset files
    are. ``bdmc_examples``: also bound log p(x) by bidirectional Monte Carlo on that many
    examples simulated from the model, with the AIS settings (:func:`vaelab.metrics.bdmc_metrics`).

    Raises:
        CheckpointError: no such run or checkpoint; DataError / ConfigError: the data.
    """
    device = runtime.select_device(device) if isinstance(device, str) else device
    if ctx is None:
        ctx = distributed.setup(device)
    if ctx.enabled:
        device = distributed.rank_device(device, ctx.local_rank)
    run = runs.open_run(run_dir, checkpoint, device)
    cfg = run.config
    data_cfg = dataclasses.replace(cfg.data, data_dir=data_dir or cfg.data.data_dir,
                                   train_limit=None, test_limit=None)
    images = Splits(data_cfg, cfg.train.seed, device)[split]
    if limit is not None:
        images = images.subset(torch.arange(min(limit, len(images))))
    name = estimator or ("is" if iw_samples is not None else cfg.eval.estimator)
    if iw_samples is not None:
        options["samples"] = iw_samples
    base = cfg.eval.options if name == cfg.eval.estimator else None
    est = estimators.get(name, base, **options)
    batch_size = batch_size if batch_size is not None else cfg.eval.batch_size
    seed = seed if seed is not None else cfg.eval.seed
    report = evaluate(run.model, images, estimator=est, batch_size=batch_size, seed=seed,
                      checkpoint_name=checkpoint, ctx=ctx, progress=progress)
    if bdmc_examples:
        ais = est.options if est.name == "ais" else estimators.AISOptions()
        report["bdmc"] = metrics.bdmc_metrics(run.model, bdmc_examples, steps=ais.steps,
                                              chains=ais.chains, batch_size=batch_size,
                                              seed=seed, ctx=ctx)
    report.update(run_fields(cfg, checkpoint, run.epoch, run.meta.get("trained_with")))
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
        ("checkpoint", _checkpoint_text(result)),
        *([("trained in", _precision_text(result["training_precision"]))]
          if result.get("training_precision") else []),
        ("NELBO (nats)", _fmt(result["nelbo"], result["nelbo_stderr"])),
        ("  reconstruction", _fmt(result["recon"])),
        ("  KL", _fmt(result["kl"])),
        (f"NLL (nats, {_estimator_text(result)})", _fmt(result["nll"], result["nll_stderr"])
         if result["nll"] is not None else "n/a: " + result.get("nll_unavailable", "")),
        ("  verdict", (result.get("verdict") or {}).get("text", "n/a")),
        ("  Pareto k-hat", _pareto_text(result.get("pareto_k"))),
        ("gap NELBO - NLL", _fmt(result["gap"])),
        ("bits/dim", _fmt(result["bits_per_dim"])),
        ("active units", f"{result['active_units']} of {result['latent_dim']}"),
    ]
    if result.get("preset"):
        source = result.get("preset_source")
        rows.append(("preset", result["preset"] + (f" (follows {source})" if source else "")))
    if result.get("trained_with"):
        rows.append(("trained with", runs.framework_text(result["trained_with"])))
    return rows


def _estimator_text(result: dict[str, Any]) -> str:
    """The NLL row's label: short; the verdict row below it says the rest."""
    est = result.get("estimator") or {}
    correction = est.get("correction")
    if correction is not None:
        return f"K={est['samples']}, corrected by AIS on {correction['examples']}"
    return est.get("description") or f"K={result['iw_samples']}"  # reports of older versions


def _pareto_text(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("median") is None:
        return "n/a (fewer than 25 samples)" if summary else "n/a"
    return (f"median {summary['median']:.2f}, max {summary['max']:.2f}, "
            f"{100 * summary['fraction_above']:.1f}% above {summary['threshold']:.2f}")


def _precision_text(precision: str) -> str:
    if precision == "fp32":
        return "fp32"
    return (f"{precision} mixed precision (autocast; float32 weights; this report computed "
            "in float32)")


def _checkpoint_text(result: dict[str, Any]) -> str:
    text = str(result["checkpoint"])
    if result.get("checkpoint_epoch") is not None:
        text += f" (epoch {result['checkpoint_epoch']}"
        text += f": {result['model_selection']})" if result.get("model_selection") else ")"
    return text


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table for the terminal, then one line per warning."""
    rows = _rows(result)
    bdmc = result.get("bdmc")
    if bdmc:
        rows.append((f"BDMC ({bdmc['n']} simulated)", f"log p(x) in [{bdmc['lower']:.3f}, "
                     f"{bdmc['upper']:.3f}], gap {bdmc['gap']:.3f} ± {bdmc['gap_stderr']:.3f}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines + [f"warning: {w}" for w in result.get("warnings", [])])


def format_markdown(result: dict[str, Any]) -> str:
    lines = ["# vaelab evaluation report", "", "| quantity | value |", "| --- | --- |"]
    lines += [f"| {k.strip()} | {v} |" for k, v in _rows(result)]
    lines += ["", "Values are nats per example, ± one standard error of the split mean.",
              "NELBO uses beta = 1 whatever the training objective was."]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    lines += [f"\n**Warning:** {w}." for w in result.get("warnings", [])]
    kl = result.get("kl_per_dim") or []
    if kl:
        order = sorted(range(len(kl)), key=lambda j: -kl[j])
        lines += ["", "KL per latent dimension (nats), largest first: "
                  + ", ".join(f"z{j}={kl[j]:.3f}" for j in order)]
    return "\n".join(lines) + "\n"
