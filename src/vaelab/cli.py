"""The ``vaelab`` command line: train, eval, plot, sample, explore, export, push, audit.

Thin by design: each subcommand parses flags, calls the library and prints.
Heavy modules (torch, matplotlib) are imported inside the handlers so that
``vaelab --help`` stays fast. Bad input exits with status 2 and one line
``vaelab: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import allocator
from . import config as config_mod
from . import threads as cpu_threads
from .errors import VaelabError

__all__ = ["main", "build_parser", "run_training"]

_D = config_mod.RunConfig()


def run_training(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`vaelab.experiment.run_training` (what ``vaelab train`` does, from Python)."""
    from .experiment import run_training as run

    return run(*args, **kwargs)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a VAE into a run directory",
        description="Train a VAE. Precedence: defaults < --preset < --config FILE < named "
        "flags < --set. The resolved config is saved as RUN_DIR/config.toml.",
    )
    p.add_argument("--preset", help=f"{' | '.join(config_mod.PRESETS)}; --preset list shows "
                   "what each follows")
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--dataset", help=f"registered name, .npz/.npy file or PNG folder "
                   f"(default: {_D.data.dataset})")
    p.add_argument("--data-dir", help="directory holding the dataset files (default: search)")
    p.add_argument("--image-size", metavar="N|HxW",
                   help="your own images: resize to N x N or HxW (shorter side, then centre "
                   "crop); without it, images of different sizes are an error")
    p.add_argument("--test-dataset", metavar="PATH",
                   help="your own data: a file or folder for the test split (default: hold "
                   "out data.test_size, 10%% up to 10,000)")
    p.add_argument("--binarize", choices=config_mod.BINARIZE_MODES,
                   help=f"(default: {_D.data.binarize})")
    p.add_argument("--likelihood", help=f"p(x|z) family (default: {_D.likelihood.name})")
    p.add_argument("--scale", help="gaussian/laplace scale: a number, learned or per-pixel")
    p.add_argument("--model", help=f"mlp | conv (default: {_D.model.kind})")
    p.add_argument("--latent-dim", type=int, help=f"(default: {_D.model.latent_dim})")
    p.add_argument("--objective", help=f"training objective: elbo | iwae "
                   f"(default: {_D.objective.kind})")
    p.add_argument("--samples", type=int,
                   help=f"z samples per example: L for elbo, k for iwae "
                   f"(default: {_D.objective.samples})")
    p.add_argument("--beta", type=float, help=f"KL weight in the objective (default: "
                   f"{_D.objective.beta}); reports always use beta = 1")
    p.add_argument("--epochs", type=int, help=f"(default: {_D.train.epochs})")
    p.add_argument("--batch-size", type=int, help=f"(default: {_D.train.batch_size})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {_D.train.lr})")
    p.add_argument("--seed", type=int, help=f"(default: {_D.train.seed})")
    p.add_argument("--device", help=f"auto | cpu | cuda[:N] (default: {_D.train.device})")
    p.add_argument("--iw-samples", type=int, help="importance samples K for the final test "
                   "NLL (the estimator's samples, e.g. eval.auto.samples; default 1000)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set model.mlp.hidden=400 or "
                   "--set prior.vampprior.components=50 (repeatable)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="RUN_DIR",
                       help="new run directory (default: runs/<dataset>-<time>)")
    where.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--no-report", action="store_true",
                   help="skip the final test evaluation, report and figures")
    p.set_defaults(handler=_cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run the way papers do (NELBO, IW NLL, ...)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--split", default="test", choices=("train", "validation", "test", "all"),
                   help="a split of the run's data; all: every example of your own file or "
                   "folder (default: test)")
    p.add_argument("--estimator", help="how -log p(x) is estimated (eval.estimator): auto "
                   "(exact quadrature for 1-2 latent dimensions, else importance sampling "
                   "corrected by AIS on a subsample), quadrature, is-ais, is (importance "
                   "sampling alone), ais (--ais-steps x --ais-chains) (default: the run's)")
    p.add_argument("--iw-samples", type=int,
                   help="importance samples per example (the estimator's samples); 5000 is "
                   "the IWAE paper protocol (default: the run's, 1000 unless its preset sets "
                   "another)")
    p.add_argument("--ais-steps", type=int, help="AIS annealing steps (eval.ais.steps; "
                   "default 100)")
    p.add_argument("--ais-chains", type=int, help="AIS chains per example, >= 25 for its "
                   "Pareto k-hat (eval.ais.chains; default 32)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="(eval.batch_size; default: the run's, 100)")
    p.add_argument("--seed", type=int, help="(eval.seed; default: the run's, 0)")
    p.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="any [eval] key, e.g. --set eval.ais.leapfrog_steps=20 (repeatable)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--data-dir", help="directory holding the dataset files (default: search)")
    p.add_argument("--device", default="auto", help="(default: %(default)s)")
    p.add_argument("--bdmc", type=int, metavar="N",
                   help="also bound log p(x) by bidirectional Monte Carlo on N examples "
                   "simulated from the model, with the AIS settings")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.set_defaults(handler=_cmd_eval)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw the figures of a run (PNG)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="(default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help="(default: RUN_DIR/figures; ./NAME-figures "
                   "for an exported model folder)")
    p.set_defaults(handler=_cmd_plot)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained model into a PNG grid")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="(default: %(default)s)")
    p.add_argument("--mean", action="store_true",
                   help="show the decoder mean instead of a sample of p(x|z)")
    p.add_argument("--out", metavar="FILE", help="(default: RUN_DIR/figures/samples-....png; "
                   "./NAME-figures/... for an exported model folder)")
    p.set_defaults(handler=_cmd_sample)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a run as a shareable model folder (safetensors + model card)",
        description="Write RUN_DIR's checkpoint into DIR: model.safetensors (tensors only), "
        "config.json, the evaluation report and a model card (README.md) whose metrics are "
        "the report's. A run without an evaluation report is refused. DIR loads with "
        "vaelab.hub.from_pretrained and works with vaelab eval/plot/sample.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="DIR")
    _add_export_options(p, "write")
    p.set_defaults(handler=_cmd_export)


def _add_export_options(p: argparse.ArgumentParser, verb: str) -> None:
    """What ``export`` and ``push`` share: which weights, their report, license, ONNX."""
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="(default: %(default)s)")
    p.add_argument("--report", metavar="FILE",
                   help="the evaluation of that checkpoint (default: RUN_DIR/report.json; "
                   "vaelab eval --json FILE writes one)")
    p.add_argument("--license", default="other",
                   help="the model card's license id, e.g. mit (default: %(default)s)")
    p.add_argument("--onnx", action="store_true",
                   help=f"also {verb} encoder.onnx and decoder.onnx (needs vaelab[onnx])")


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push", help="export a run and upload it to a Hugging Face Hub repository",
        description="Export RUN_DIR (as vaelab export) and upload the folder to REPO_ID in "
        "one commit, creating the repository if needed. Needs vaelab[hub] and a token "
        "(hf auth login or HF_TOKEN); HF_ENDPOINT chooses another Hub.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("repo_id", metavar="REPO_ID", help="owner/name, e.g. alice/fashion-vae")
    p.add_argument("--private", action="store_true", help="create the repository private")
    _add_export_options(p, "upload")
    p.set_defaults(handler=_cmd_push)


def _add_explore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explore",
        help="explore a run's latent space in a local web page",
        description="Serve a page for a trained run: its encoded test images on the plane of "
        "latent_scatter.png, a point to drag with the decoder mean at it, sliders for the "
        "other latent directions, and a clicked test image's reconstruction, NELBO and NLL. "
        "Listens on 127.0.0.1 (this machine only) unless --host says otherwise; prints the "
        "URL; Ctrl-C stops it.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 shows the run's "
                   "test images to anyone who can reach this machine)")
    p.add_argument("--port", type=int, default=0, help="(default: 0, a free port)")
    p.add_argument("--points", type=int, default=2000,
                   help="test images on the scatter (default: %(default)s)")
    p.add_argument("--data-dir", help="directory holding the dataset files (default: search)")
    browser = p.add_mutually_exclusive_group()
    browser.add_argument("--open", dest="browser", action="store_const", const=True,
                         help="open the page in the default web browser (default: when a "
                         "desktop display is found)")
    browser.add_argument("--no-browser", dest="browser", action="store_const", const=False,
                         help="only print the URL")
    p.set_defaults(handler=_cmd_explore, browser=None)


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="explain what a hand-written VAE loss really optimises",
        description="Relate a loss written as a * recon + w * KL to the per-example negative "
        "ELBO: overall scale, effective beta, implied likelihood and sigma, the missing "
        "constant, how x_hat is read and clipped. Describe the loss with flags (--recon ...), "
        "or let vaelab call your loss function on designed inputs (--loss), or audit a widely "
        "copied loss (--preset). WARNING: --loss imports your file or module and runs your "
        "function in this process: only audit code you trust (your own).",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--loss", metavar="FILE.py:FUNCTION",
                       help="probe this function (or package.module:FUNCTION, e.g. "
                       "keras.losses:binary_crossentropy); imports and RUNS that code")
    which.add_argument("--preset", metavar="NAME",
                       help="audit a widely copied loss; --preset list shows them")
    p.add_argument("--roles", help="with --loss: what the positional arguments are, in order, "
                   "from x,x_hat,mu,logvar,z (default: from the parameter names, else "
                   "x,x_hat,mu,logvar)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="with --loss: a fixed keyword argument, e.g. --set M_N=0.00025 "
                   "(repeatable; Python literals, else strings)")
    p.add_argument("--framework", default="auto", choices=("auto", "numpy", "torch", "keras"),
                   help="with --loss: (default: %(default)s: NumPy arrays, then torch tensors; "
                   "Keras 3 runs on KERAS_BACKEND=torch)")
    p.add_argument("--recon", default=None, choices=("bce", "mse", "sse"),
                   help="(default: bce)")
    p.add_argument("--recon-reduction", default=None, choices=("sum", "mean"),
                   help="reduction over data dimensions (default: mean; sum for sse)")
    p.add_argument("--recon-multiplier", type=float, default=None,
                   help="factor on the reconstruction term, e.g. 784 (default: 1)")
    p.add_argument("--kl-reduction", default=None, choices=("sum", "mean"),
                   help="reduction over latent dimensions (default: sum)")
    p.add_argument("--kl-weight", type=float, default=None,
                   help="factor on the KL, e.g. M_N = batch/N (default: 1)")
    p.add_argument("--batch-reduction", default=None, choices=("mean", "sum", "none"),
                   help="(default: mean)")
    p.add_argument("--batch-size", type=int, help="the batch size you train with: a loss "
                   "summed over the batch then gets its scale as a number (else 'B per batch "
                   "of B'); needed with --loss when a weight depends on it (a KL summed over "
                   "the batch, an M_N computed inside)")
    p.add_argument("--data-shape", default="784",
                   help="comma-separated data shape, e.g. 28,28,1 (default: %(default)s)")
    p.add_argument("--latent-dim", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--data", default=None, choices=("binary", "grey", "continuous"),
                   help="what the data is (default: binary for bce, continuous for mse/sse)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=_cmd_audit)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vaelab",
        description="Train, evaluate and visualise VAEs with numbers you can trust "
        "(nats per example, exact likelihoods, importance-sampled log p(x)).",
    )
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log data resolution steps")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_train, _add_eval, _add_plot, _add_sample, _add_explore, _add_export,
                _add_push, _add_audit):
        add(sub)
    return parser


# --------------------------------------------------------------------------- handlers


def _train_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Named flags as a config layer (only those given); ``--scale`` is the chosen
    likelihood's option (``likelihood.<name>.scale``), ``--iw-samples`` ``eval.is.samples``."""
    mapping = {
        ("data", "dataset"): args.dataset, ("data", "data_dir"): args.data_dir,
        ("data", "image_size"): args.image_size, ("data", "test_dataset"): args.test_dataset,
        ("data", "binarize"): args.binarize, ("likelihood", "name"): args.likelihood,
        ("likelihood", "scale"): args.scale, ("model", "kind"): args.model,
        ("model", "latent_dim"): args.latent_dim, ("objective", "kind"): args.objective,
        ("objective", "samples"): args.samples, ("objective", "beta"): args.beta,
        ("train", "epochs"): args.epochs, ("train", "batch_size"): args.batch_size,
        ("train", "lr"): args.lr, ("train", "seed"): args.seed,
        ("train", "device"): args.device,
    }
    layer: dict[str, Any] = {}
    for (section, key), value in mapping.items():
        if value is not None:
            layer.setdefault(section, {})[key] = value
    if args.iw_samples is not None:  # the chosen estimator's samples (auto, is-ais, is)
        layer.setdefault("eval", {})["samples"] = args.iw_samples
    return layer


def _cmd_train(args: argparse.Namespace) -> int:
    from .experiment import run_training

    if args.preset == "list":
        width = max(map(len, config_mod.PRESETS))
        for name, source in config_mod.PRESET_SOURCES.items():
            print(f"{name.ljust(width)}  {source}  ({config_mod.PRESETS_DIR / name}.toml)")
        return 0
    flags = _train_flags(args)
    given: set[str] | None = None  # a resumed run's config is used as saved
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.toml"
        if not saved.is_file():
            raise VaelabError(f"nothing to resume in {run_dir}: no config.toml (check the path)")
        if args.preset or args.config:
            raise VaelabError("--resume takes its config from the run: drop --preset/--config")
        cfg = config_mod.from_dict(
            config_mod.merge(config_mod.load_toml(saved), flags,
                             *[config_mod.parse_override(o) for o in args.set]), saved=True)
        resume = (run_dir / "checkpoints" / "last.json").exists()
        if not resume and _is_main_rank():
            # Stopped (e.g. killed) before its first checkpoint: nothing was saved that
            # could be lost, so start the run again from epoch 0 with its saved config.
            print(f"{run_dir} has no checkpoint yet: starting it from epoch 0")
    else:
        cfg = config_mod.resolve(preset=args.preset, file=args.config, overrides=args.set,
                                 extra=flags)
        given = config_mod.given_keys(args.preset, args.config, args.set, flags)
        resume = False
        if args.out:
            run_dir = Path(args.out)
        else:
            import time

            stem = Path(cfg.data.dataset).stem
            run_dir = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if _is_main_rank():
            print(f"run directory: {run_dir}")
    _ACTIVE_RUN["train"] = run_dir
    run_training(cfg, run_dir, resume=resume, report=not args.no_report, given=given)
    return 0


def _eval_layer(args: argparse.Namespace) -> dict[str, Any]:
    """``vaelab eval``'s flags and ``--set eval.*`` as a layer over the run's ``[eval]``."""
    section: dict[str, Any] = {}
    for key, value in (("estimator", args.estimator), ("batch_size", args.batch_size),
                       ("seed", args.seed)):
        if value is not None:
            section[key] = value
    if args.iw_samples is not None:  # the chosen estimator's samples (auto, is-ais, is)
        section["samples"] = args.iw_samples
    ais = {k: v for k, v in (("steps", args.ais_steps), ("chains", args.ais_chains))
           if v is not None}
    if ais:
        section["ais"] = ais
    layer = {"eval": section} if section else {}
    for item in args.set:
        override = config_mod.parse_override(item)
        if set(override) != {"eval"}:
            raise VaelabError(f"--set {item}: vaelab eval changes [eval] only (the model and "
                              "its data are the run's): e.g. --set eval.ais.steps=200")
        layer = config_mod.merge(layer, override)
    return layer


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import evaluate
    from .experiment import Experiment, Session

    for flag, value, example in (("--bdmc", args.bdmc, 500), ("--limit", args.limit, 200)):
        if value is not None and value <= 0:
            raise VaelabError(f"{flag} must be positive, got {value}: e.g. {flag} {example}")
    layer = _eval_layer(args)
    # Under torchrun every rank evaluates its share of the batches (same numbers as one
    # process); rank 0 prints and writes.
    with Session.start(args.device) as session:
        exp = Experiment.open(args.run_dir, args.checkpoint, session, overrides=layer,
                              data_dir=args.data_dir)
        result = exp.evaluate(args.split, args.checkpoint, limit=args.limit, bdmc=args.bdmc)
    if not session.is_main:
        return 0
    print(evaluate.format_table(result))
    if args.json:
        from ._io import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .experiment import Experiment, Session

    with Session.start("cpu") as session:
        written = Experiment.open(args.run_dir, args.checkpoint, session).figures(
            args.checkpoint, args.out or _figures_dir(args.run_dir))
    for path in written:
        print(path)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from . import plots, runtime

    runtime.configure_threads()

    if args.n <= 0:
        raise VaelabError(f"--n must be positive, got {args.n}: e.g. --n 64")
    out, beside = args.out, _figures_dir(args.run_dir)
    if out is None and beside is not None:
        suffix = "-mean" if args.mean else ""
        out = beside / f"samples-{args.checkpoint}-seed{args.seed}{suffix}.png"
    path = plots.sample_figure(args.run_dir, n=args.n, seed=args.seed,
                               checkpoint=args.checkpoint, mean=args.mean, out=out)
    print(path)
    return 0


def _cmd_explore(args: argparse.Namespace) -> int:
    from .experiment import Session
    from .explore import Explorer, display_available, make_server, serve

    if args.points <= 0:
        raise VaelabError(f"--points must be positive, got {args.points}: e.g. --points 2000")
    if not 0 <= args.port <= 65535:
        raise VaelabError(f"--port must be in 0..65535 (0: a free port), got {args.port}")
    with Session.start("cpu") as session:
        explorer = Explorer.open(args.run_dir, args.checkpoint, session, points=args.points,
                                 data_dir=args.data_dir)
        # Loaded: from here on the server mostly waits for clicks, so it leaves the cores
        # it registered to other vaelab runs (a training started later takes them all).
        cpu_threads.report()
        cpu_threads.withdraw()
        try:
            server = make_server(explorer, args.host, args.port, verbose=args.verbose)
        except OSError as exc:
            raise VaelabError(f"cannot listen on {args.host} port {args.port}: "
                              f"{exc.strerror or exc}: choose another --port (0: a free one) "
                              "or --host") from None
        wanted = display_available() if args.browser is None else args.browser
        serve(server, open_browser=wanted, echo=lambda line: print(line, flush=True))
    return 0


def _figures_dir(run_dir: str) -> Path | None:
    """Where figures of an exported model folder go by default: ``./NAME-figures``, not
    into the folder (it may be a Hub cache snapshot, and it is not a run directory);
    None for a run directory (its own ``figures/``)."""
    from .runs import is_exported

    return Path(f"{Path(run_dir).resolve().name}-figures") if is_exported(run_dir) else None


def _cmd_export(args: argparse.Namespace) -> int:
    from . import hub

    folder = hub.export_run(args.run_dir, args.out_dir, checkpoint=args.checkpoint,
                            report=args.report, license=args.license, onnx=args.onnx)
    for path in sorted(folder.iterdir()):
        print(path)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from . import hub

    url = hub.push(args.run_dir, args.repo_id, private=args.private,
                   checkpoint=args.checkpoint, report=args.report, license=args.license,
                   onnx=args.onnx)
    print(url)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from . import audit

    flags = {"--recon": args.recon, "--recon-reduction": args.recon_reduction,
             "--recon-multiplier": args.recon_multiplier, "--kl-reduction": args.kl_reduction,
             "--kl-weight": args.kl_weight, "--batch-reduction": args.batch_reduction}
    probe_only = {"--roles": args.roles, "--set": args.set or None,
                  "--framework": None if args.framework == "auto" else args.framework}
    if args.loss or args.preset:
        given = [name for name, value in flags.items() if value is not None]
        if given:
            raise VaelabError(f"{given[0]} describes a loss by flags: with --loss or --preset "
                              "the loss itself is probed; drop it")
    if not args.loss:
        given = [name for name, value in probe_only.items() if value is not None]
        if given:
            raise VaelabError(f"{given[0]} applies to --loss only")
    if args.preset:
        from .audit.commands import preset_command

        return preset_command(args.preset, json_output=args.json)
    try:
        shape = tuple(int(v) for v in args.data_shape.split(",") if v.strip())
    except ValueError:
        raise VaelabError(
            f"--data-shape {args.data_shape!r} is not a list of integers: e.g. 28,28,1"
        ) from None
    if args.loss:
        from .audit.commands import loss_command

        return loss_command(args.loss, shape, args.latent_dim, roles=args.roles,
                            fixed=args.set, batch_size=args.batch_size,
                            framework=args.framework, data=args.data, json_output=args.json)
    kwargs: dict[str, Any] = dict(
        recon=args.recon or "bce", recon_reduction=args.recon_reduction,
        recon_multiplier=1.0 if args.recon_multiplier is None else args.recon_multiplier,
        kl_reduction=args.kl_reduction or "sum",
        kl_weight=1.0 if args.kl_weight is None else args.kl_weight,
        batch_reduction=args.batch_reduction or "mean", data_shape=shape,
        latent_dim=args.latent_dim,
    )
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    if args.data is not None:
        kwargs["data"] = args.data
    result = audit.explain(**kwargs)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.text)
    return 0


#: The run directory `vaelab train` is writing (for the Ctrl-C message).
_ACTIVE_RUN: dict[str, Path] = {}


def _where_to_resume() -> str:
    """After Ctrl-C: where the last checkpoint is and the command that resumes the run."""
    run_dir = _ACTIVE_RUN.get("train")
    if run_dir is None:
        return " (nothing was written: run the same command again)"
    last = run_dir / "checkpoints" / "last.json"
    if not last.is_file():
        return (f"; {run_dir} has no checkpoint yet (no epoch finished): start again with "
                f"vaelab train --resume {run_dir}")
    try:
        epoch = json.loads(last.read_text())["meta"]["train_state"]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        epoch = "?"
    return (f"; the last checkpoint is {run_dir / 'checkpoints' / 'last'} (epoch {epoch}): "
            f"resume with vaelab train --resume {run_dir}")


def _is_main_rank() -> bool:
    """False on the non-zero ranks of a torchrun job (they stay quiet)."""
    import os

    return os.environ.get("RANK", "0") == "0"


#: The commands that compute (they choose CPU threads) and how to override their choice.
_OVERRIDE_HINTS = {
    "train": "set --set train.threads=N or OMP_NUM_THREADS to override",
    "eval": "set OMP_NUM_THREADS to override",
    "plot": "set OMP_NUM_THREADS to override",
    "sample": "set OMP_NUM_THREADS to override",
    "export": "set OMP_NUM_THREADS to override",
    "explore": "set OMP_NUM_THREADS to override",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vaelab`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.command in _OVERRIDE_HINTS:
            # Before any handler imports torch: libgomp reads OMP_WAIT_POLICY only then.
            cpu_threads.startup(_OVERRIDE_HINTS[args.command])
            allocator.keep_freed_memory()  # no page faults for every batch's tensors
        code = int(args.handler(args) or 0)
        cpu_threads.report()  # after the work: a command stopped by bad input prints one line
        return code
    except VaelabError as exc:
        print(f"vaelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vaelab: interrupted{_where_to_resume()}", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"vaelab: error: {exc.strerror or exc} ({exc.filename or 'no file'}): check "
              "free space and permissions; saved checkpoints are untouched", file=sys.stderr)
        return 1
    finally:
        cpu_threads.withdraw()
