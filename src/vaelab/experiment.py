"""The pipeline of a command: one config, one session, each split loaded once, one model.

``vaelab train`` resolves and validates its config once, starts one :class:`Session`
(device, process group, CPU threads), builds one :class:`Experiment` (the splits, loaded
on first use and kept; the model, built once) and runs train -> evaluate -> report ->
figures on those objects. ``vaelab eval`` and ``vaelab plot`` open a finished run the same
way (:meth:`Experiment.open`: its config and checkpoint read once). Nothing downstream
reloads what a stage before it had; the run directory is for resuming and for later
commands::

    from vaelab import config, experiment

    cfg = config.resolve(preset="pytorch-example", overrides=["train.epochs=3"])
    with experiment.Session.start(cfg.train.device, cfg.train.threads) as session:
        exp = experiment.Experiment.create(cfg, "runs/x", session)
        summary = exp.run()               # train, then the test report and the figures

    with experiment.Session.start() as session:
        exp = experiment.Experiment.open("runs/x", "best", session)
        report = exp.evaluate("validation")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import config as config_mod
from . import distributed, estimators, evaluate, metrics, models, runs, runtime, train
from .data import DATASETS, Splits
from .errors import VaelabError

__all__ = ["Session", "Experiment", "run_training", "SLOW_EVALUATION_SECONDS"]

#: Above this many seconds, `vaelab train` says at the start how long its final evaluation
#: will take.
SLOW_EVALUATION_SECONDS = 15 * 60


@dataclass
class Session:
    """Where a command computes: the device, the process group (under torchrun) and torch's
    CPU thread count, set up once (:meth:`start`) and closed at the end."""

    device: torch.device
    ctx: distributed.Context = field(default_factory=distributed.Context)

    @classmethod
    def start(cls, device: str | torch.device = "auto", threads: int | None = None) -> Session:
        """Select the device (``auto``: CUDA when available), join the process group when
        launched by torchrun (each rank on its own GPU), and choose the CPU threads
        (:func:`vaelab.runtime.configure_threads`).

        Raises:
            ConfigError: not a device, or CUDA asked for without one.
        """
        device = runtime.select_device(device) if isinstance(device, str) else device
        ctx = distributed.setup(device)
        if ctx.enabled:
            device = distributed.rank_device(device, ctx.local_rank)
        runtime.configure_threads(threads, device, ctx.local_world_size)
        return cls(device, ctx)

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def close(self) -> None:
        distributed.teardown(self.ctx)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Experiment:
    """A run: its config, directory, session, splits and model, handed from stage to stage.

    Build one with :meth:`create` (a new run, or one to resume) or :meth:`open` (a run that
    trained, for evaluation and figures).

    Attributes:
        cfg: the resolved :class:`~vaelab.config.RunConfig`.
        run_dir: the run directory.
        session: the :class:`Session`.
        data: the :class:`~vaelab.data.Splits` (each split loaded at most once).
        model: the model (one object for the whole command).
        weights: which checkpoint's weights the model holds (``"best"``, ``"last"``, or
            None before training), and ``epoch`` the epoch they were written after.
    """

    def __init__(self, cfg: config_mod.RunConfig, run_dir: str | Path, session: Session,
                 data: Splits, model: nn.Module, weights: str | None = None,
                 epoch: int | None = None) -> None:
        self.cfg, self.run_dir, self.session = cfg, Path(run_dir), session
        self.data, self.model = data, model
        self.weights, self.epoch = weights, epoch
        #: the checkpoint meta's ``trained_with`` (weights another framework trained)
        self.trained_with: dict[str, Any] | None = None
        self._same_as_last: set[str] = set()

    # ----------------------------------------------------------------------- construction

    @classmethod
    def create(cls, cfg: config_mod.RunConfig, run_dir: str | Path, session: Session, *,
               given: set[str] | frozenset[str] | None = None, model: nn.Module | None = None,
               echo: Callable[[str], None] = print) -> Experiment:
        """A run of ``cfg`` in ``run_dir``; then the model of ``cfg`` is built, seeded with
        ``train.seed`` (or ``model``, your own, is used).

        ``given``: the keys a preset, file, flag or ``--set`` set (``vaelab train`` passes
        them; :func:`vaelab.config.given_keys`). With it, for your own data (a file or
        folder) the likelihood, binarisation and model that were not chosen are chosen from
        its training split (one line says what). Without it, ``cfg`` is used as it is.

        Raises:
            ConfigError, DataError: bad config or data (every rank stops under torchrun).
        """
        with distributed.agree(session.ctx, "setup"):
            data = Splits(cfg.data, cfg.train.seed, session.device,
                          progress=session.is_main)
            if given is not None:
                cfg, data = _defaults_from_data(cfg, given, data,
                                                echo if session.is_main else _quiet)
            if model is None:
                torch.manual_seed(cfg.train.seed)
                model = models.build_from_config(cfg, data["train"].event_shape)
        return cls(cfg, run_dir, session, data, model.to(session.device))

    @classmethod
    def open(cls, run_dir: str | Path, checkpoint: str = "best",
             session: Session | None = None, *, overrides: dict[str, Any] | None = None,
             data_dir: str | None = None, model: nn.Module | None = None) -> Experiment:
        """A run that trained, with ``checkpoint``'s weights (read once): for evaluation and
        figures. ``overrides``: a config layer over the run's (e.g. ``{"eval":
        {"estimator": "ais"}}``; only ``[eval]`` and ``[data]`` make sense here);
        ``data_dir`` where the dataset files are now. Limits on the splits
        (``data.train_limit``, ``data.test_limit``) are dropped: the splits are whole.

        Raises:
            CheckpointError: no such run or checkpoint; ConfigError: a bad override.
        """
        session = session or Session(torch.device("cpu"))
        run = runs.open_run(run_dir, checkpoint, session.device, model=model)
        cfg = config_mod.from_dict(overrides, base=run.config) if overrides else run.config
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, data_dir=data_dir or cfg.data.data_dir, train_limit=None,
            test_limit=None))
        data = Splits(cfg.data, cfg.train.seed, session.device, progress=session.is_main)
        exp = cls(cfg, run_dir, session, data, run.model, checkpoint, run.epoch)
        exp.trained_with = run.meta.get("trained_with")
        return exp

    # ----------------------------------------------------------------------- stages

    def train(self, resume: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
        """Train (:func:`vaelab.train.train_and_evaluate`) on these splits and this model;
        afterwards the model holds the last epoch's weights."""
        summary = train.train_and_evaluate(
            self.cfg, self.run_dir, resume=resume, model=self.model, ctx=self.session.ctx,
            echo=echo if self.session.is_main else _quiet, data=self.data)
        self.weights, self.epoch = "last", summary["epochs"]
        if summary["best_epoch"] == summary["epochs"]:  # best is the last epoch: in memory
            self._same_as_last.add("best")
        return summary

    def use(self, checkpoint: str) -> None:
        """Give the model ``checkpoint``'s weights (``best`` or ``last``), reading the file
        only when the model does not hold them already."""
        if checkpoint == self.weights or (self.weights == "last"
                                          and checkpoint in self._same_as_last):
            self.weights = checkpoint
            return
        meta = ckpt.load_checkpoint(self.run_dir / "checkpoints" / checkpoint, model=self.model,
                                    map_location=self.session.device,
                                    expect_config=config_mod.to_dict(self.cfg))
        self.weights, self.epoch = checkpoint, (meta.get("train_state") or {}).get("epoch")
        self.trained_with = meta.get("trained_with")
        self._same_as_last.clear()

    def evaluate(self, split: str = "test", checkpoint: str = "best", *,
                 limit: int | None = None, bdmc: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
        """The report (:func:`vaelab.evaluate.evaluate`) of ``checkpoint`` on ``split``,
        with the run's ``[eval]`` settings; ``limit``: the first N examples; ``bdmc``: also
        bound log p(x) by bidirectional Monte Carlo on that many simulated examples."""
        self.use(checkpoint)
        self.model.eval()
        images = self.data[split]
        if limit is not None:
            images = images.subset(torch.arange(min(limit, len(images))))
        est = self.estimator()
        report = evaluate.evaluate(self.model, images, estimator=est,
                                   batch_size=self.cfg.eval.batch_size,
                                   seed=self.cfg.eval.seed, checkpoint_name=checkpoint,
                                   ctx=self.session.ctx, progress=progress)
        if bdmc:
            ais = est.options if est.name == "ais" else estimators.AISOptions()
            report["bdmc"] = metrics.bdmc_metrics(
                self.model, bdmc, steps=ais.steps, chains=ais.chains,
                batch_size=self.cfg.eval.batch_size, seed=self.cfg.eval.seed,
                ctx=self.session.ctx)
        report.update(evaluate.run_fields(self.cfg, checkpoint, self.epoch, self.trained_with))
        report["weights_sha256"] = ckpt.weights_fingerprint(self.model)  # what was evaluated
        return report

    def estimator(self) -> Any:
        """The run's ``[eval]`` estimator, built from its options."""
        return estimators.get(self.cfg.eval.estimator, self.cfg.eval.options)

    def figures(self, checkpoint: str = "best", out_dir: str | Path | None = None,
                report: dict[str, Any] | None = None) -> list[Path]:
        """The run's figures (:func:`vaelab.plots.draw_figures`) of ``checkpoint``, from the
        test split already loaded and, when given, the report just computed."""
        from . import plots  # matplotlib: only when figures are drawn

        self.use(checkpoint)
        self.model.eval()
        records = plots.read_metrics(self.run_dir)
        report = report if report is not None else plots.read_report(self.run_dir)
        run = plots.RunFigures(self.model, self.data["test"], self.cfg, records, checkpoint,
                               self.epoch, self.run_dir.name, report)
        return plots.draw_figures(run, out_dir if out_dir is not None
                                  else self.run_dir / "figures")

    def evaluation_seconds(self) -> float:
        """Roughly how long the final test evaluation takes (all ranks together)."""
        test = self.data["test"]
        return evaluate.estimate_seconds(self.model, test, estimator=self.estimator(),
                                         batch_size=self.cfg.eval.batch_size
                                         ) / self.session.ctx.world_size

    def run(self, resume: bool = False, report: bool = True,
            echo: Callable[[str], None] = print) -> dict[str, Any]:
        """What ``vaelab train`` does: train, then with ``report`` evaluate the best
        checkpoint on the test split, write ``report.json``/``report.md`` and draw the
        figures. Under torchrun every rank trains and evaluates its share; rank 0 writes
        and prints. Returns the training summary, with ``report``."""
        main = self.session.is_main
        say = echo if main else _quiet
        if report and main:
            self._note_evaluation_cost(say)
        summary = self.train(resume=resume, echo=echo)
        if not report:
            return summary
        result = self.evaluate("test", "best")
        summary["report"] = result
        if main:
            evaluate.write_report(result, self.run_dir)
            say(evaluate.format_table(result))
            self._figures(result, say)
        return summary

    # ----------------------------------------------------------------------- helpers

    def _note_evaluation_cost(self, echo: Callable[[str], None]) -> None:
        family = getattr(self.model, "likelihood", None)
        if not getattr(family, "normalized", True) or not len(self.data["test"]):
            return
        seconds = self.evaluation_seconds()
        if seconds > SLOW_EVALUATION_SECONDS:
            est = self.estimator()
            est = est.for_model(self.model) if hasattr(est, "for_model") else est
            echo(f"note: the final test evaluation ({len(self.data['test']):,} examples, "
                 f"{est.describe()}) will take about {seconds / 60:.0f} min on this machine; "
                 "choose a cheaper estimate (e.g. --iw-samples), or train with --no-report "
                 "and run vaelab eval later")

    def _figures(self, report: dict[str, Any], echo: Callable[[str], None]) -> None:
        try:
            written = self.figures("best", report=report)
        except ImportError as exc:  # matplotlib missing: figures are optional
            echo(f"figures skipped: {exc}")
            return
        echo(f"wrote {len(written)} figures to {self.run_dir / 'figures'}")


def run_training(cfg: config_mod.RunConfig, run_dir: str | Path, *, resume: bool = False,
                 report: bool = True, echo: Callable[[str], None] = print,
                 given: set[str] | frozenset[str] | None = None,
                 model: nn.Module | None = None) -> dict[str, Any]:
    """What ``vaelab train`` does, from Python: one session, one experiment, train ->
    report -> figures (:meth:`Experiment.run`). ``given``: as for :meth:`Experiment.create`
    (None: ``cfg`` as it is). Returns the training summary, with ``report``."""
    with Session.start(cfg.train.device, cfg.train.threads) as session:
        exp = Experiment.create(cfg, run_dir, session, given=given, model=model, echo=echo)
        return exp.run(resume=resume, report=report, echo=echo)


def _quiet(_line: str) -> None:
    pass


#: Flat ``model.*`` keys that are an architecture's own options (a model chosen by hand).
_ARCHITECTURE_OPTIONS = {"hidden", "channels", "blocks", "gated"}


# --------------------------------------------------------------------------- your own data


def _defaults_from_data(cfg: config_mod.RunConfig, given: set[str] | frozenset[str],
                        data: Splits, echo: Callable[[str], None]
                        ) -> tuple[config_mod.RunConfig, Splits]:
    """For your own data (a file or folder), when neither the likelihood nor the binarisation
    was chosen: 0/1 data get a Bernoulli likelihood; 8-bit grey levels a discretised
    logistic, 8-bit colour a discretised logistic mixture (both exact likelihoods of the
    8-bit values, no binarisation) and a conv model sized for the images when the model
    was not chosen either. The training split is read once, without binarisation, and kept
    (every choice here keeps the data unbinarised). Says in one line what was chosen."""
    if cfg.data.dataset in DATASETS or {"likelihood.name", "data.binarize"} & given:
        return cfg, data
    data = data.with_config(dataclasses.replace(cfg.data, binarize="none"))
    images = data["train"]
    c, h, w = images.event_shape
    black_and_white = bool(((images.images == 0) | (images.images == 255)).all())
    if images.levels == 2 or black_and_white:
        layer: dict[str, Any] = {"data": {"binarize": "none"}, "likelihood": {"name": "bernoulli"}}
        said = "0/1 images: a Bernoulli likelihood, no binarisation"
    else:
        name = "discretized-logistic" if c == 1 else "discretized-logistic-mixture"
        layer = {"data": {"binarize": "none"}, "likelihood": {"name": name}}
        said = (f"8-bit {'grey' if c == 1 else 'colour'} images: no binarisation, the {name} "
                "likelihood")
        model_given = any(key == "model.kind" or (key.startswith("model.") and (
            key.count(".") == 2 or key.split(".")[1] in _ARCHITECTURE_OPTIONS)) for key in given)
        if not model_given:
            try:
                sized = models.sized_for(images.event_shape)
            except VaelabError:  # too small to halve: keep the MLP
                sized = None
            if sized is not None:
                if "model.latent_dim" in given:
                    sized.pop("latent_dim")
                layer["model"] = sized
                conv = sized["conv"]
                said += (f", a conv model sized for {h}x{w} (channels "
                         f"{','.join(map(str, conv['channels']))}, {conv['blocks']} residual "
                         "blocks per stage)")
    echo(f"vaelab: {said}; choose others with --likelihood, --binarize, --model or --set")
    cfg = config_mod.from_dict(layer, base=cfg)
    return cfg, data.with_config(cfg.data)

