"""Run a published protocol end to end and record it: ``python benchmarks/reproduce.py NAME``.

Trains the preset ``NAME`` with the ``vaelab`` command line (so the JSON records the exact
commands a user would type), then evaluates the selected checkpoint on the test split by
importance sampling alone with each importance-sample count of the protocol (the papers'
and pythae's estimates) and with vaelab's default estimate (``auto``: importance sampling
corrected by AIS on a random 400 test images; ``--no-default`` skips it), and writes
``benchmarks/results/reproduce_<NAME>.json``: the per-epoch curve, the final NLLs with their
standard errors and K, the checkpoint that was selected and why, wall times, versions and
the commands.

``--epochs N`` makes a smoke run (for CI and for trying the script): its JSON says
``"smoke": true``, is written to ``reproduce_<NAME>.smoke.json`` unless ``--out`` is given,
and is never a row of the README's table. ``--budget N`` runs the protocol with its first N
epochs only, when the full protocol does not fit the time available: the JSON says
``"budget_epochs"`` next to the protocol's epochs, and the table says so. ``--set KEY=VALUE``
changes the protocol (e.g. ``prior.name=normal`` for the same budget with the standard
prior); ``--tag`` names such a variant's files. A run directory that exists is resumed (or
only evaluated when training finished), so a long protocol survives an interruption; an
evaluation already in the run directory is kept, and ``--iw-samples K`` evaluates with only
some of the protocol's K (e.g. K = 200 first, the JSON written, then the rest).

Protocols and their published values are listed in :data:`PROTOCOLS` with their sources.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine, source_digest  # noqa: E402
from vaelab.config import PRESETS  # noqa: E402

#: name -> preset, importance-sample counts of the test NLL, published values (nats).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "mnist-vae": {
        "preset": "mnist-vae",
        "iw_samples": [200, 5000],
        "model": "VAE, 784-400-40 MLP, Bernoulli, N(0, I) prior",
        "published": {"value": 89.9, "metric": "test NLL (nats)",
                      "source": "Rezende & Mohamed (2015), Variational inference with "
                                "normalizing flows, Table 2 (DLGM, diagonal covariance)"},
        "pythae": {"value": 89.78, "stderr_over_5_repeats": 0.01, "iw_samples": 200,
                   "source": "clementchadebec/benchmark_VAE, examples/scripts/reproducibility/"
                             "README.md (vae.py)"},
        "binarization_note": "the preset trains on Larochelle's binarized MNIST, as pythae; "
                             "runs with --set data.dataset=mnist use one seeded static draw "
                             "of MNIST instead (the config in the JSON says which)",
    },
    "mnist-vampprior": {
        "preset": "mnist-vampprior",
        "iw_samples": [200, 5000],
        "model": "VAE with a VampPrior (500 pseudo-inputs), gated dense 784-300-300-40",
        "published": {"value": 85.57, "metric": "test NLL (nats)",
                      "source": "Tomczak & Welling (2018), VAE with a VampPrior, Table 1 "
                                "(VAE, L = 1, VampPrior; static MNIST)"},
        "pythae": {"value": 85.79, "stderr_over_5_repeats": 0.00, "iw_samples": 5000,
                   "source": "clementchadebec/benchmark_VAE, examples/scripts/reproducibility/"
                             "README.md (vamp.py)"},
        "binarization_note": "the preset trains on Larochelle's binarized MNIST, as pythae; "
                             "runs with --set data.dataset=mnist use one seeded static draw "
                             "of MNIST instead (the config in the JSON says which)",
    },
}

# Rezende & Mohamed (2015), Table 2: the same DLGM with planar flows of length K in q(z|x)
# (upper bounds on -log p(x), nats; K = 10: 87.5, 20: 86.5, 40: 85.7, 80: 85.1); run here with
# the mnist-vae protocol (pythae's reproduction of the DLGM row), the flow amortised as the
# paper's (its parameters from the encoder).
for _k, _value in ((10, 87.5), (40, 85.7)):
    PROTOCOLS[f"mnist-planar-{_k}"] = {
        "preset": "mnist-vae",
        "set": ["posterior.flow=planar", f"posterior.planar.length={_k}"],
        "iw_samples": [200, 5000],
        "model": f"VAE with planar flows of length {_k} in q(z|x), MLP 784-400-40",
        "published": {"value": _value, "metric": "test NLL (nats)",
                      "source": f"Rezende & Mohamed (2015), Variational inference with "
                                f"normalizing flows, Table 2 (DLGM + NF, k = {_k})"},
        "pythae": None,
        "binarization_note": PROTOCOLS["mnist-vae"]["binarization_note"],
    }


def _run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` (output appended to ``log`` and echoed); return its wall time."""
    started = time.perf_counter()
    with log.open("a") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        proc = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-5:]
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}:\n"
                         + "\n".join(tail))
    return time.perf_counter() - started


def _finished(run_dir: Path, budget: int | None) -> bool:
    """Whether the run reached ``budget`` epochs (or its config's epochs) or stopped early."""
    last = run_dir / "checkpoints" / "last.json"
    if not last.is_file():
        return False
    meta = json.loads(last.read_text())
    state, cfg = meta["meta"]["train_state"], meta["meta"]["config"]
    return state["epoch"] >= (budget or cfg["train"]["epochs"]) or state.get("stopped_early", False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(PROTOCOLS))
    p.add_argument("--epochs", type=int, help="smoke run: train only N epochs (not the protocol)")
    p.add_argument("--budget", type=int,
                   help="the protocol's first N epochs only (when the full run does not fit)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change the protocol (passed to vaelab train --set)")
    p.add_argument("--tag", help="suffix of this variant's run directory and JSON")
    p.add_argument("--data-dir", help="where the dataset files are (passed to vaelab)")
    p.add_argument("--run-dir", type=Path, help="run directory (default: runs/reproduce-NAME)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for training and evaluation")
    p.add_argument("--eval-limit", type=int,
                   help="smoke runs only: evaluate the first N test images")
    p.add_argument("--iw-samples", type=int, nargs="+", metavar="K",
                   help="evaluate with only these of the protocol's K (recorded in the JSON)")
    p.add_argument("--eval-set", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="a setting of the default estimate (smoke runs: a smaller AIS check)")
    p.add_argument("--no-default", action="store_true",
                   help="skip vaelab's default estimate (importance sampling with each K only)")
    p.add_argument("--out", type=Path, help="JSON output path")
    args = p.parse_args()
    protocol = PROTOCOLS[args.name]
    if args.iw_samples and not set(args.iw_samples) <= set(protocol["iw_samples"]):
        raise SystemExit(f"--iw-samples: {args.name} evaluates with K in "
                         f"{protocol['iw_samples']}")
    smoke = args.epochs is not None
    if smoke and args.budget is not None:
        raise SystemExit("--epochs (smoke) and --budget exclude each other")
    if args.eval_limit is not None and not smoke:
        raise SystemExit("--eval-limit is for smoke runs only: the protocol evaluates the "
                         "whole test set")
    stem = f"{args.name}{'-' + args.tag if args.tag else ''}{'-smoke' if smoke else ''}"
    run_dir = args.run_dir or Path("runs") / f"reproduce-{stem}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log = run_dir.parent / f"{run_dir.name}.log"
    vaelab = [sys.executable, "-m", "vaelab"]
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    commands: list[str] = []
    timing: dict[str, float] = {}

    # --- training (resumed when the run directory already holds one)
    if (run_dir / "checkpoints" / "last.json").is_file():
        if not _finished(run_dir, args.budget):
            cmd = [*vaelab, "train", "--resume", str(run_dir), "--no-report", *data]
            if args.budget:
                cmd += ["--epochs", str(args.budget)]
            timing["train_seconds_this_invocation"] = _run(cmd, env, log)
            commands.append(" ".join(cmd[2:]))
    else:
        cmd = [*vaelab, "train", "--preset", protocol["preset"], "--out", str(run_dir),
               "--no-report", *data]
        if smoke or args.budget:
            cmd += ["--epochs", str(args.epochs or args.budget)]
        for item in [*protocol.get("set", []), *args.set]:
            cmd += ["--set", item]
        timing["train_seconds_this_invocation"] = _run(cmd, env, log)
        commands.append(" ".join(cmd[2:]))

    # --- evaluation of the selected checkpoint: importance sampling alone with each K of the
    # protocol (the papers' and pythae's numbers), then vaelab's default estimate (auto:
    # importance sampling corrected by AIS on a random 400 test images)
    evaluations = []
    plan = [(f"k{k}", ["--estimator", "is", "--iw-samples", str(k)], k)
            for k in args.iw_samples or protocol["iw_samples"]]
    if not args.no_default:
        plan.append(("default", ["--estimator", "auto",
                                 *[f"--set={item}" for item in args.eval_set]], None))
    for label, how, k in plan:  # (not `stem`: the JSON's own name below uses that)
        out = run_dir / f"eval-test-{label}.json"
        cmd = [*vaelab, "eval", str(run_dir), "--split", "test", "--checkpoint", "best", *how,
               "--json", str(out), *data]
        if args.eval_limit is not None:
            cmd += ["--limit", str(args.eval_limit)]
        if smoke or not out.is_file():  # else: evaluated by an earlier invocation, kept
            seconds = _run(cmd, env, log)
            out.write_text(json.dumps({**json.loads(out.read_text()),
                                       "seconds": round(seconds, 1)}, indent=1))
        commands.append(" ".join(cmd[2:]))
        report = json.loads(out.read_text())  # "seconds": None if an older run wrote it
        evaluations.append({"estimator": (report.get("estimator") or {}).get("name", "is"),
                            "iw_samples": k, "nll": report["nll"],
                            "nll_stderr": report["nll_stderr"],
                            "nll_mc_stderr": report.get("nll_mc_stderr"),
                            "verdict": report.get("verdict"), "nelbo": report["nelbo"],
                            "nelbo_stderr": report["nelbo_stderr"],
                            "n_examples": report["n_examples"],
                            "seconds": report.get("seconds"),
                            "report": report})

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())["meta"]
    config = best["config"]
    result = {
        "protocol": args.name,
        "variant": {"tag": args.tag, "set": args.set} if args.tag or args.set else None,
        "smoke": smoke,
        "budget_epochs": args.budget,
        "protocol_epochs": PRESETS[protocol["preset"]]["train"]["epochs"],
        "model": protocol["model"],
        "published": protocol["published"],
        "pythae": protocol.get("pythae"),
        "binarization_note": protocol.get("binarization_note"),
        "run_dir": str(run_dir),
        "commands": commands,
        "config": config,
        "epochs_trained": records[-1]["epoch"],
        "model_selection": {"rule": "lowest validation NELBO (beta = 1, one z sample per "
                                    "example), as pythae's BaseTrainer keeps best_model",
                            "selected_epoch": best["train_state"]["best_epoch"],
                            "validation_nelbo": best["train_state"]["best_val_nelbo"]},
        "test": evaluations,
        "curve": [{k: r.get(k) for k in ("epoch", "lr", "train_nelbo", "val_nelbo", "val_recon",
                                         "val_kl", "seconds")} for r in records],
        "train_seconds_total": round(sum(r["seconds"] for r in records), 1),
        "timing": {k: round(v, 1) for k, v in timing.items()},
        "versions": {"vaelab_source": source_digest(), **machine()},
    }
    text = json.dumps(result, indent=2)
    out = args.out or RESULTS_DIR / f"reproduce_{stem.replace('-smoke', '')}" \
        f"{'.smoke' if smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    summary = {"protocol": args.name, "smoke": smoke, "epochs": result["epochs_trained"],
               "selected_epoch": result["model_selection"]["selected_epoch"],
               "test": [{k: e[k] for k in ("estimator", "iw_samples", "nll", "nll_stderr",
                                           "nelbo")}
                        for e in evaluations]}
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
