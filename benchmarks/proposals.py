"""Benchmark: better importance-sampling proposals against q(z|x), measured against strong AIS.

The default estimator (``auto`` / ``is-ais``) subtracts importance sampling's bias measured
by AIS on a random subsample; the correction's standard error is sd(n_i - a_i) / sqrt(m),
so it is set by the spread of the per-example paired differences between importance
sampling and AIS. This script asks whether a better proposal (``is-refined``: q(z|x)
refined per example by Adam steps on its ELBO, optionally widened, Student-t, or mixed
with q) shrinks that bias and that spread at about the cost of K = 1,000 with q.

On the first ``--examples`` test images of RUN_DIR's best checkpoint (the run's
evaluation seed), one thread:

- the reference: AIS with ``--reference-steps`` and half as many steps (x 4 chains, 1
  leapfrog step), extrapolated in 1/T (``2 a_T - a_{T/2}``), per example; and the default's
  own check (AIS 1,000 and 500 steps x 4 chains, extrapolated), per example;
- each candidate: mean NLL, its bias against the reference (mean of the paired differences
  with its standard error), the SD of the paired differences against the reference and
  against the default's check (the latter sets the default's correction standard error:
  ``sd / sqrt(500)`` is given), the Pareto k-hat (median, share above the threshold),
  decoder passes per example (a backward pass counted as 2 forward) and wall seconds.

With ``--full``, also the default estimator (``auto``) on the whole test set with q(z|x)
(K = 1,000, the default before) and with the refined proposal (``refine_steps = 20``,
K = 750): its correction, the correction's standard error, the verdict and the time.

``--costly`` measures the candidates at the budget ``auto`` gives a costly decoder (the 28x28
conv model: 100-200 decoder passes per example for phase 1; ``--check-steps 250`` adds the
cheaper check's spreads), and its ``--full`` runs ``auto`` with its own defaults on the
first images (against the reference) and on the whole test set.

Writes ``benchmarks/results/proposals.json`` (keyed by the run directory's name; rows are
written as they come; ``--reuse`` keeps the earlier reference and rows of the same
candidates).

Run: ``OMP_NUM_THREADS=1 python benchmarks/proposals.py [RUN_DIR] --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_RUN = Path(__file__).resolve().parent / "resume" / "mnist-vae-larochelle-seed1"

#: (name, estimator, options): the candidates, plain importance sampling first.
CANDIDATES: list[tuple[str, str, dict[str, Any]]] = [
    ("is-q-1000", "is", {"samples": 1000}),
    ("is-q-5000", "is", {"samples": 5000}),
    ("refined-10x4-k880", "is-refined", {"samples": 880, "refine_steps": 10}),
    ("refined-20x4-k760", "is-refined", {"samples": 760, "refine_steps": 20}),
    ("refined-50x4-k400", "is-refined", {"samples": 400, "refine_steps": 50}),
    ("refined-20x4-k760-lr0.02", "is-refined", {"samples": 760, "refine_steps": 20,
                                                 "refine_lr": 0.02}),
    ("refined-20x4-k760-lr0.1", "is-refined", {"samples": 760, "refine_steps": 20,
                                                "refine_lr": 0.1}),
    ("refined-20x4-k760-wide1.2", "is-refined", {"samples": 760, "refine_steps": 20,
                                                  "widen": 1.2}),
    ("refined-20x4-k760-t5", "is-refined", {"samples": 760, "refine_steps": 20,
                                             "proposal": "student-t", "df": 5}),
    ("refined-20x4-k760-def0.1", "is-refined", {"samples": 760, "refine_steps": 20,
                                                 "defensive": 0.1}),
    ("refined-20x4-k750-wide1.2-def0.1", "is-refined", {"samples": 750, "refine_steps": 20,
                                                         "widen": 1.2, "defensive": 0.1}),
    ("q-wide1.2-k1000", "is-refined", {"samples": 1000, "refine_steps": 0, "widen": 1.2}),
    ("q-t5-k1000", "is-refined", {"samples": 1000, "refine_steps": 0,
                                  "proposal": "student-t", "df": 5}),
    ("refined-100x4-k1000", "is-refined", {"samples": 1000, "refine_steps": 100}),
    ("q-wide1.5-k1000", "is-refined", {"samples": 1000, "refine_steps": 0, "widen": 1.5}),
    ("refined-20x4-k760-wide1.3", "is-refined", {"samples": 760, "refine_steps": 20,
                                                  "widen": 1.3}),
    ("refined-20x4-k760-wide1.5", "is-refined", {"samples": 760, "refine_steps": 20,
                                                  "widen": 1.5}),
    ("refined-20x4-k760-wide2", "is-refined", {"samples": 760, "refine_steps": 20,
                                                "widen": 2.0}),
    ("refined-20x4-k760-lr0.02-wide1.3", "is-refined", {"samples": 760, "refine_steps": 20,
                                                         "refine_lr": 0.02, "widen": 1.3}),
    ("refined-50x4-k400-wide1.3", "is-refined", {"samples": 400, "refine_steps": 50,
                                                  "widen": 1.3}),
    ("refined-20x4-k760-wide1.3-def0.1", "is-refined", {"samples": 760, "refine_steps": 20,
                                                         "widen": 1.3, "defensive": 0.1}),
]

#: ``--costly``: candidates at the budget ``auto`` gives a costly decoder (the 28x28 conv
#: model: about 100-200 decoder passes per example for phase 1): q with K = 100 (today's),
#: and cheap refinements (one draw per step) with the default's widening and mixture.
COSTLY: list[tuple[str, str, dict[str, Any]]] = [
    ("is-q-100", "is", {"samples": 100}),
    ("is-q-200", "is", {"samples": 200}),
    ("is-q-1000", "is", {"samples": 1000}),
] + [(f"refined-{steps}x{draws}-k{k}-wide1.2-def0.1", "is-refined",
      {"samples": k, "refine_steps": steps, "refine_samples": draws, "widen": 1.2,
       "defensive": 0.1})
     for steps, draws, k in [(5, 1, 85), (10, 1, 70), (20, 1, 40), (10, 1, 170), (20, 1, 140),
                             (40, 1, 80), (20, 4, 750)]]

#: ``--costly --full``: the default (``auto``, its own options) on the first images (against
#: the reference) and on the whole test set.
FULL_COSTLY = [("auto-default", {})]

#: Options of ``is-refined`` that the candidates leave unset: a plain refined Gaussian.
PLAIN = {"widen": 1.0, "defensive": 0.0}

#: ``--full``: the default (``auto``) on the whole test set, before and after.
FULL = [("auto-q-k1000", {"samples": 1000, "refine_steps": 0}),
        ("auto-refined-20x4-k750", {"samples": 750, "refine_steps": 20})]


def _stats(d: torch.Tensor) -> tuple[float, float, float]:
    d = d.double()
    return float(d.mean()), float(d.std() / math.sqrt(d.numel())), float(d.std())


def measure(args: argparse.Namespace, earlier: dict[str, Any] | None, save: Any) -> None:
    from vaelab import estimators, evaluate, metrics
    from vaelab.experiment import Experiment, Session
    from vaelab.psis import pareto_k_threshold

    torch.set_num_threads(1)
    session = Session.start("cpu")
    exp = Experiment.open(args.run, "best", session, data_dir=args.data_dir)
    test = exp.data["test"]
    subset = test.subset(torch.arange(min(args.examples, len(test))))
    seed, batch = exp.cfg.eval.seed, exp.cfg.eval.batch_size
    out: dict[str, Any] = {"run": str(args.run), "examples": len(subset),
                           "dataset": test.name, "checkpoint_epoch": exp.epoch,
                           "model": exp.cfg.model.kind, "latent_dim": exp.model.latent_dim,
                           "seed": seed, "threads": torch.get_num_threads(),
                           "reference": {}, "rows": [], "full_test_set": []}
    if earlier and earlier.get("examples") == len(subset):
        out["reference"] = earlier.get("reference", {})
        out["full_test_set"] = earlier.get("full_test_set", [])
        kept = {r["candidate"]: r for r in earlier.get("rows", [])}
    else:
        kept = {}

    def run(est: Any, repeats: int = 1) -> tuple[dict[str, Any], float]:
        """The result (the same every time: the draws are seeded) and the median seconds."""
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = metrics.nll_metrics(exp.model, subset, estimator=est, batch_size=batch,
                                         seed=seed, per_example=True)
            seconds.append(time.perf_counter() - started)
        return result, common.median(seconds)

    ais = out["reference"].setdefault("ais", {})
    for steps in sorted({args.reference_steps, args.reference_steps // 2, 1000, 500,
                         *args.check_steps, *(t // 2 for t in args.check_steps)}):
        if str(steps) in ais:
            continue
        est = estimators.get("ais", steps=steps, chains=4, leapfrog_steps=1)
        result, seconds = run(est)
        ais[str(steps)] = {"nll": result["nll"], "seconds": seconds,
                           "per_example_nll": result["per_example_nll"].tolist()}
        print(f"ais {steps} x 4: {result['nll']:.3f} in {seconds:.0f} s", flush=True)
        save(out)

    def per(steps: int) -> torch.Tensor:
        return torch.tensor(ais[str(steps)]["per_example_nll"], dtype=torch.float64)

    def extrapolated(steps: int) -> torch.Tensor:
        """AIS with ``steps`` and half as many, extrapolated in 1/T, per example."""
        return 2 * per(steps) - per(steps // 2)

    big, half = args.reference_steps, args.reference_steps // 2
    reference = extrapolated(big)
    check = extrapolated(1000)
    plain = per(1000)
    out["reference"].update({
        "what": f"AIS {big} and {half} steps x 4 chains x 1 leapfrog, extrapolated in 1/T "
                f"(2 a_{big} - a_{half}); 'check' is the default's own (1000 and 500 steps)",
        "nll": float(reference.mean()), "nll_unextrapolated": float(per(big).mean()),
        "drift": _stats(per(half) - per(big))[:2], "check_nll": float(check.mean()),
        "check_minus_reference": _stats(check - reference),
        "check_unextrapolated_minus_reference": _stats(plain - reference),
        "per_example_nll": reference.tolist()})
    for steps in args.check_steps:
        out["reference"][f"check_{steps}_minus_reference"] = _stats(extrapolated(steps)
                                                                    - reference)
    save(out)

    names = {name for name, _, _ in CANDIDATES}
    for name, kind, options in CANDIDATES:
        if name in kept:
            out["rows"].append(kept[name])
            continue
        est = estimators.get(kind, **({**PLAIN, **options} if kind == "is-refined" else options))
        result, seconds = run(est, args.repeats)
        nll = result["per_example_nll"]
        bias, bias_se, sd_ref = _stats(nll - reference)
        _, _, sd_check = _stats(nll - check)
        _, _, sd_plain = _stats(nll - plain)
        k = result["per_example_pareto_k"]
        threshold = pareto_k_threshold(est.samples)
        row = {"candidate": name, "estimator": kind, "options": options,
               "description": est.describe(), "nll": result["nll"],
               "bias": bias, "bias_stderr": bias_se, "paired_sd_reference": sd_ref,
               "paired_sd_check": sd_check, "correction_stderr_500": sd_check / math.sqrt(500),
               "paired_sd_check_unextrapolated": sd_plain,
               "pareto_k_median": float(k.nanmedian()),
               "pareto_k_above_threshold": float((k > threshold).double().mean()),
               "pareto_k_above_0.7": float((k > 0.7).double().mean()),
               "decoder_passes": est.cost, "seconds": seconds,
               "per_example_nll": nll.tolist()}
        for steps in args.check_steps:  # a cheaper check: its paired spread
            row[f"paired_sd_check_{steps}"] = _stats(nll - extrapolated(steps))[2]
        print(json.dumps({k: v for k, v in row.items() if k != "per_example_nll"}), flush=True)
        out["rows"].append(row)
        save(out)
    out["rows"] += [row for name, row in kept.items() if name not in names]
    save(out)
    done = {(row["estimator"], row["examples"]) for row in out["full_test_set"]}
    full = (FULL_COSTLY if args.costly else FULL) if args.full else []
    splits = [subset, test] if args.costly else [test]
    for (name, options), split in ((f, s) for f in full for s in splits):
        if (name, len(split)) in done:
            continue
        est = estimators.get("auto", **options)
        started = time.perf_counter()
        result = metrics.nll_metrics(exp.model, split, estimator=est, batch_size=batch,
                                     seed=seed)
        seconds = time.perf_counter() - started
        c = result["estimator"]["correction"]
        row = {"estimator": name, "options": options, "examples": result["n"],
               "description": result["estimator"]["description"], "nll": result["nll"],
               "nll_mc_stderr": result["nll_mc_stderr"], "is_nll_all": result["nll"] + c["mean"],
               "correction": {k: c[k] for k in ("examples", "mean", "stderr", "drift")},
               "paired_sd": c["stderr"] * math.sqrt(c["examples"]),
               "verdict": evaluate.verdict({**result, "latent_dim": exp.model.latent_dim}),
               "seconds": seconds}
        if split is subset:
            row["minus_reference"] = result["nll"] - out["reference"]["nll"]
        print(json.dumps(row), flush=True)
        out["full_test_set"].append(row)
        save(out)
    session.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", type=Path, default=DEFAULT_RUN, metavar="RUN_DIR")
    p.add_argument("--data-dir", default=None, help="where the dataset files are now")
    p.add_argument("--examples", type=int, default=200, help="the first N test images")
    p.add_argument("--reference-steps", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3, help="timings per candidate (median)")
    p.add_argument("--full", action="store_true", help="also the default (auto) with q and "
                   "with the refined proposal on the whole test set (about 15 minutes)")
    p.add_argument("--only", nargs="*", default=None, help="only these candidates")
    p.add_argument("--costly", action="store_true", help="the candidates at a costly "
                   "decoder's budget (100-200 passes per example) instead")
    p.add_argument("--check-steps", type=int, nargs="*", default=[], help="also AIS with "
                   "these steps (and half), and each candidate's paired spread against them "
                   "as a check")
    p.add_argument("--reuse", action="store_true", help="keep the earlier reference and rows")
    p.add_argument("--name", default=None, help="the entry's key (default: the run "
                   "directory's name)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "proposals.json")
    args = p.parse_args()
    if args.costly:
        CANDIDATES[:] = COSTLY
    if args.only is not None:
        CANDIDATES[:] = [c for c in CANDIDATES if c[0] in args.only]
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}

    def save(entry: dict[str, Any], name: str = args.name or args.run.name) -> None:
        results[name] = {**entry, "machine": common.machine()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    measure(args, results.get(args.name or args.run.name) if args.reuse else None, save)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
