"""Benchmark: the log p(x) estimators side by side on a trained model, against converged AIS.

Issue 23. For the ``best`` checkpoint of each run directory given, on its first
``--examples`` test images (default 1000), with the run's evaluation seed:

- ``default``: vaelab's default estimator with its current defaults, whatever the run's
  config saved (``auto``: exact quadrature for 1-2 latent
  dimensions; else importance sampling with K = 1,000 corrected by AIS on a random 400 of
  the images, with its drift check);
- ``is-1000``, ``is-5000``: importance sampling alone (1,000 was the default before);
- ``ais-T``: AIS with ``--reference-chains`` chains, 1 leapfrog step, T = ``--reference-steps``
  then doubled until two successive values agree to ``--tolerance`` nats (0.02): the
  converged reference;
- ``quadrature`` for latent spaces of 1 or 2 dimensions: exact, and the reference then.

Each row: the mean NLL over the images, its Monte-Carlo standard error, the difference from
the reference and the wall time. With ``--full``, the default estimator and importance
sampling with K = 1,000 on the whole test set too (their times: the cost ratio, and the
verdict ``vaelab eval`` prints); ``--full default`` only the default. Writes
``benchmarks/results/estimators.json`` (one entry
per run, keyed by the run directory's name; rows are written as they come). ``--reuse``
keeps the rows of an earlier entry for the same run and number of images, except the
default estimator's (rerun after its settings change without rerunning the AIS reference).

Run: ``python benchmarks/estimators.py RUN_DIR [RUN_DIR ...] [--examples 1000] [--full]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _row(name: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"estimator": name, "nll": result["nll"], "mc_stderr": result["nll_mc_stderr"],
            "seconds": seconds, "description": result["estimator"]["description"],
            "correction": result["estimator"].get("correction")}


def measure(run_dir: Path, examples: int, tolerance: float, first_steps: int, max_steps: int,
            chains: int, full: tuple[str, ...], save: Any,
            earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    from vaelab import estimators, evaluate, metrics
    from vaelab.experiment import Experiment, Session

    session = Session.start("cpu")
    exp = Experiment.open(run_dir, "best", session)
    test = exp.data["test"]
    subset = test.subset(torch.arange(min(examples, len(test))))
    seed, batch = exp.cfg.eval.seed, exp.cfg.eval.batch_size
    latent = exp.model.latent_dim
    out: dict[str, Any] = {"run": str(run_dir), "latent_dim": latent, "examples": len(subset),
                           "dataset": test.name, "checkpoint_epoch": exp.epoch,
                           "model": exp.cfg.model.kind, "rows": []}

    kept = {}
    if earlier and earlier.get("examples") == len(subset):
        kept = {(r["estimator"], r["examples"]): r
                for r in [*earlier.get("rows", []), *earlier.get("full_test_set", [])]
                if r["estimator"] != "default"}

    def run(name: str, est: Any, data: Any = subset) -> dict[str, Any]:
        if (name, metrics.num_examples(data)) in kept:
            print(f"reusing {name} on {metrics.num_examples(data)} examples", flush=True)
            return kept[(name, metrics.num_examples(data))]
        started = time.perf_counter()
        result = metrics.nll_metrics(exp.model, data, estimator=est, batch_size=batch,
                                     seed=seed)
        row = _row(name, result, time.perf_counter() - started)
        row["examples"] = metrics.num_examples(data)
        row["verdict"] = evaluate.verdict({**result, "latent_dim": latent})
        print(json.dumps(row), flush=True)
        return row

    def add(row: dict[str, Any]) -> float:
        out["rows"].append(row)
        save(out)
        return row["nll"]

    add(run("default", estimators.get("auto")))
    if latent <= estimators.MAX_LATENT_DIM:
        add(run("quadrature", estimators.get("quadrature")))
    for k in (1000, 5000):
        add(run(f"is-{k}", estimators.get("is", samples=k)))
    reference, steps, previous = None, first_steps, None
    while steps <= max_steps:
        value = add(run(f"ais-{steps}", estimators.get("ais", steps=steps, chains=chains,
                                                        leapfrog_steps=1)))
        if previous is not None and abs(value - previous) < tolerance:
            reference = {"estimator": f"ais-{steps}", "nll": value,
                         "converged": f"ais-{steps // 2} and ais-{steps} agree to "
                                      f"{abs(value - previous):.3f} nats"}
            break
        previous, steps = value, steps * 2
    exact = next((r for r in out["rows"] if r["estimator"] == "quadrature"), None)
    if exact is not None:
        reference = {"estimator": "quadrature", "nll": exact["nll"], "converged": "exact"}
    out["reference"] = reference
    for row in out["rows"]:
        row["minus_reference"] = row["nll"] - reference["nll"] if reference else None
    save(out)
    if full:
        out["full_test_set"] = []
        for name in full:
            est = estimators.get("auto" if name == "default" else "is", samples=1000)
            out["full_test_set"].append(run(name, est, test))
            save(out)
    session.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--reference-steps", type=int, default=2000, help="the first AIS reference")
    p.add_argument("--reference-chains", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=32000)
    p.add_argument("--full", nargs="*", choices=("default", "is-1000"), default=None,
                   help="also these on the whole test set (no names: both); is-1000 on a "
                        "conv model takes about an hour on one thread")
    p.add_argument("--reuse", action="store_true",
                   help="keep an earlier entry's rows for the same run and images, except "
                        "the default estimator's")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "estimators.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for run_dir in args.runs:
        def save(entry: dict[str, Any], name: str = run_dir.name) -> None:
            results[name] = {**entry, "machine": common.machine()}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")

        measure(run_dir, args.examples, args.tolerance, args.reference_steps, args.max_steps,
                args.reference_chains,
                ("default", "is-1000") if args.full == [] else tuple(args.full or ()), save,
                results.get(run_dir.name) if args.reuse else None)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
