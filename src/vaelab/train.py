"""Training: ``train_and_evaluate(cfg, run_dir)``, in the shape of Flax's examples.

- :func:`train_step`: one optimizer step on one batch.
- :func:`train_epoch`: the epoch's shuffle, batches, steps and float64 running sums.
- :func:`evaluate`: the validation NELBO (beta = 1, fixed noise, so epochs are comparable).
- :func:`train_and_evaluate`: setup, then per epoch train, evaluate, keep the best, save.
- :func:`autocast_dtype`, :func:`precision_context`: ``train.precision`` (mixed precision).

The final test report and the figures are not part of training: the caller runs them on
the saved run (``vaelab train`` does: :func:`vaelab.evaluate.evaluate_run`, then
:func:`vaelab.plots.plot_run`).

Conventions:

- Randomness is a pure function of ``(seed, epoch, purpose)`` (:mod:`vaelab.rng`), so a
  run resumed at an epoch boundary continues bitwise, and N processes reproduce a
  one-process run up to float rounding.
- The batch is reduced once: the loss is the mean over the *global* batch of the
  objective's per-example values; epoch figures are sums over examples / their number.
- Mixed precision (``train.precision`` = bf16 or fp16) speeds the training step only: the
  model's forward runs under ``torch.autocast`` (its backward follows the forward's
  dtypes); weights, gradients and optimizer state stay float32, the model returns float32
  distribution parameters (:class:`vaelab.models.VAE` casts its encoder's and decoder's
  outputs), so the objective's per-example values and every sum are float32/float64.
  Validation, the sample grids, checkpoints and the report never run under autocast. fp16
  (CUDA only) scales the loss with ``torch.amp.GradScaler``, whose state is saved with
  ``checkpoints/last`` (``meta["grad_scaler"]``) so a resume continues it.
- Only rank 0 writes. ``checkpoints/last`` is written last in an epoch (after ``best``,
  ``metrics.jsonl`` and the sample grid): it is the resume point, so a kill never leaves
  those behind.

Run directory layout::

    RUN_DIR/config.toml  metrics.jsonl  checkpoints/{last,best}.json+.safetensors
           figures/samples/epoch-NNN.png  .lock   (report.* and figures/*.png: the caller)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, config, distributed, grids, metrics, models, objectives, runtime
from ._io import atomic_write_text
from .config import RunConfig
from .data import ImageSet, Splits
from .errors import CheckpointError, ConfigError, VaelabError
from .registry import Registry
from .rng import Purpose, seeded_generator
from .schedules import learning_rate

__all__ = [
    "OPTIMIZERS",
    "RESUMABLE_KEYS",
    "RunLocked",
    "TrainingDiverged",
    "autocast_dtype",
    "evaluate",
    "global_batch_noise",
    "make_optimizer",
    "precision_context",
    "run_lock",
    "train_and_evaluate",
    "train_epoch",
    "train_step",
]

# Config keys that may change when resuming a run (everything else must match); "*": the
# whole section (the evaluation does not change what is trained).
RESUMABLE_KEYS = {
    "train": {"epochs", "lr", "patience", "device", "threads", "grad_clip", "eval_batch_size",
              "compile"},
    "eval": {"*"},
    "data": {"data_dir", "test_limit"},
}


class TrainingDiverged(VaelabError):
    """A loss term became NaN or Inf; the last good checkpoint is kept."""


class RunLocked(VaelabError):
    """Another process is writing to the same run directory."""


# --------------------------------------------------------------------------- optimizers

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("adam")
def _adam(params: list[nn.Parameter], cfg: config.TrainConfig,
          device: torch.device) -> torch.optim.Optimizer:
    """Adam; eps ``train.adam_eps`` (default 1e-4 with the iwae schedule, as Burda et al.;
    else PyTorch's 1e-8). torch's fused kernel on CPU and CUDA (one pass per parameter
    instead of about ten per-tensor ops: 14% faster epochs at batch 128 on a 2-core CPU; the
    same updates to float rounding), the default implementation elsewhere."""
    eps = cfg.adam_eps if cfg.adam_eps is not None else (
        1e-4 if cfg.lr_schedule == "iwae" else 1e-8)
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, lr=cfg.lr, eps=eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=cfg.lr, eps=eps)


@OPTIMIZERS.register("rmsprop")
def _rmsprop(params: list[nn.Parameter], cfg: config.TrainConfig,
             device: torch.device) -> torch.optim.Optimizer:
    """RMSprop with PyTorch's defaults (alpha 0.99, eps 1e-8): pythae's vamp.py. The foreach
    implementation on CPU too (torch picks it only on CUDA): the same updates bit for bit,
    one call per op for all parameters instead of a Python loop over them (the VampPrior
    model's 21 tensors: 4.4 -> 3.5 ms per step on 2 cores)."""
    foreach = True if device.type in ("cpu", "cuda") else None  # None: torch's own choice
    return torch.optim.RMSprop(params, lr=cfg.lr, foreach=foreach)


def make_optimizer(model: nn.Module, cfg: config.TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``model``'s parameters.

    Raises:
        ConfigError: an unknown optimizer (the message lists the registered ones).
    """
    return OPTIMIZERS[cfg.optimizer](list(model.parameters()), cfg, device)


# --------------------------------------------------------------------------- one step


#: A batch's objective more than this many times the run's first one (and at least 1 nat
#: per example) means the run diverged: training only lowers it, and no epoch of a sane run
#: is three orders of magnitude above the untrained model.
DIVERGENCE_FACTOR = 1000.0


class _NonFinite(Exception):
    """The loss of a batch is NaN/Inf (raised before any update)."""

    def __init__(self, per_example: torch.Tensor, terms: objectives.ELBOTerms | None) -> None:
        super().__init__("non-finite loss")
        self.per_example, self.terms = per_example, terms


class _Exploded(Exception):
    """The loss of a batch is finite but above the divergence limit (raised before any
    update)."""

    def __init__(self, value: float, limit: float) -> None:
        super().__init__("exploding loss")
        self.value, self.limit = value, limit


def train_step(objective: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, *,
               kl_weight: float | torch.Tensor, generator: torch.Generator | None = None,
               eps: torch.Tensor | None = None, batch_total: int | None = None,
               world_size: int = 1, grad_clip: float | None = None,
               explode_above: float | None = None, autocast: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None
               ) -> tuple[torch.Tensor, objectives.ELBOTerms | None]:
    """One optimizer step on the batch ``x``; returns the objective's ``(per_example, terms)``.

    The loss is the sum of the per-example values / ``batch_total`` x ``world_size``: the
    global batch mean once DDP averages the gradients of ``world_size`` processes.
    ``autocast``: run the objective's forward under ``torch.autocast`` with this dtype
    (:func:`autocast_dtype`); its per-example values must come back float32. ``scaler``:
    fp16's gradient scaler (the step is skipped, and the scale lowered, when a scaled
    gradient overflows).

    Raises:
        _NonFinite: the loss is NaN/Inf; nothing was updated.
        _Exploded: ``|loss|`` exceeds ``explode_above``; nothing was updated.
        ConfigError: under ``autocast`` the objective came back in half precision (a model
            of your own whose distributions take the layers' bfloat16/float16 outputs).
    """
    batch_total = batch_total if batch_total is not None else x.shape[0]
    with precision_context(x.device, autocast):
        per_example, terms = objective(x, kl_weight, generator, eps, batch_total)
    if per_example.dtype in _HALF:
        raise ConfigError(
            f"under autocast ({autocast}) the objective came back as {per_example.dtype}: its "
            "sums would lose precision; make the model's encode/decode return float32 "
            "distribution parameters (cast the last layer's output with .float(), as "
            "vaelab.models.VAE does) or train with train.precision=fp32")
    loss = per_example.sum() * (world_size / batch_total)
    value = loss.item()  # one host sync per step, for both checks
    if not math.isfinite(value):  # one op; torch.isfinite costs five
        raise _NonFinite(per_example, terms)
    if explode_above is not None and abs(value) > explode_above:
        raise _Exploded(value, explode_above)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
        optimizer.step()
        return per_example, terms
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
    scaler.step(optimizer)  # skipped when a scaled gradient is Inf/NaN
    scaler.update()
    return per_example, terms


_HALF = (torch.float16, torch.bfloat16)

#: ``train.precision`` -> the autocast dtype (None: no autocast).
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of ``train.precision`` on ``device`` (None for fp32).

    Raises:
        ConfigError: a precision the device cannot train in (fp16 on a CPU, bf16 on a GPU
            without bfloat16, either on another kind of device); the message names the fix.
    """
    if precision not in _AUTOCAST:
        raise ConfigError(f"unknown train.precision {precision!r}: choose one of "
                          f"{', '.join(config.PRECISIONS)}")
    dtype = _AUTOCAST[precision]
    if dtype is None:
        return None
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError(
            "train.precision = fp16 needs a CUDA device (float16 autocast on a CPU is slow "
            "and needs a gradient scaler): use train.precision=bf16 on a CPU, or "
            "train.device=cuda")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.precision = bf16 needs a GPU with bfloat16 ({torch.cuda.get_device_name(device)} "
            "has none): use train.precision=fp16 (with a gradient scaler) or fp32")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.precision = {precision} is supported on cpu and cuda, not "
                          f"{device.type}: use train.precision=fp32")
    return dtype


def _grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """fp16's loss scaler (PyTorch's defaults: 2^16, halved on overflow, doubled after
    2,000 clean steps)."""
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()  # pragma: no cover - torch 2.2: CUDA's


def _native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    flags = runtime.describe_machine()["kernel_flags"]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_context(device: torch.device, dtype: torch.dtype | None
                      ) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype)``, or nothing for ``dtype`` None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def global_batch_noise(samples: int, batch_total: int, latent_dim: int,
                       generator: torch.Generator, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(samples, batch_total, latent_dim)`` standard-normal noise for the global batch.

    Block ``s`` is the ``s``-th ``randn((batch_total, latent_dim), generator=generator)``
    call in ``dtype`` (the model's): the draws :func:`vaelab.objectives.elbo_terms` and
    ``iwae_bound`` make from the same generator for a batch of ``batch_total``, so slicing
    it along dim 1 gives each rank exactly the noise of its examples in a one-process run.
    """
    blocks = [torch.randn((batch_total, latent_dim), generator=generator, dtype=dtype,
                          device=generator.device) for _ in range(samples)]
    return torch.stack(blocks).to(device)


# --------------------------------------------------------------------------- one epoch


@dataclass
class _Loop:
    """What the epochs share (built once by :func:`train_and_evaluate`)."""

    cfg: RunConfig
    model: nn.Module
    objective: nn.Module  # the objective, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    train_set: ImageSet
    val_set: ImageSet | None  # evaluated after every epoch (train.validation_split)
    ctx: distributed.Context
    device: torch.device
    run_dir: Path
    progress: bool
    autocast: torch.dtype | None = None  # train.precision's autocast dtype; None: float32
    scaler: torch.amp.GradScaler | None = None  # fp16's gradient scaler
    compiled: bool = False  # train.compile: objective is torch.compile'd, noise drawn outside

    @property
    def data_kind(self) -> str:
        return getattr(getattr(self.model, "likelihood", None), "data_kind", "unit")


#: torch.compile's cache entries per function: one per model architecture and batch shape
#: (dynamo's default, 8, would turn the objective silently eager after a few runs in one
#: process, e.g. a sweep or benchmarks/train.py --compile).
COMPILE_RECOMPILE_LIMIT = 64


def _check_compilable(model: nn.Module, train_set: ImageSet, device: torch.device) -> None:
    """``train.compile`` draws the noise outside the compiled step, by the rule of a diagonal
    Gaussian q(z|x) or a flow posterior: refuse other posteriors before anything is written.

    Raises:
        ConfigError: q(z|x) of one training example is neither.
    """
    kind = getattr(getattr(model, "likelihood", None), "data_kind", "unit")
    one = train_set.inputs(torch.arange(1), kind,
                           torch.Generator(train_set.images.device).manual_seed(0)).to(device)
    was_training = model.training
    model.eval()  # one example through the encoder: no batch statistics touched
    try:
        with torch.no_grad():
            q = model.encode(one)
    finally:
        model.train(was_training)
    if not (objectives._is_diagonal_normal(q) or hasattr(q, "push")):
        raise ConfigError(
            f"train.compile needs q(z|x) to be a diagonal Gaussian or a flow posterior (the "
            f"noise is drawn outside the compiled step), but the model's encode returns "
            f"{type(q).__name__}: set train.compile=false")


def _compiled(objective: nn.Module) -> nn.Module:
    """``train.compile``: ``objective`` through torch.compile, one graph per batch shape (an
    epoch's last batch is usually smaller: two graphs); train_epoch passes the noise and the
    KL weight as tensors, so neither a warm-up nor the noise recompiles."""
    import torch._dynamo  # loaded by torch.compile anyway; its config is set here

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, COMPILE_RECOMPILE_LIMIT)
    return torch.compile(objective, dynamic=False)


def _compile_failed(error: RuntimeError) -> bool:
    """``error`` is torch.compile's backend failing (no C++ compiler, a lowering error); only
    asked when the objective is compiled, so ``torch._dynamo`` is loaded."""
    return isinstance(error, torch._dynamo.exc.BackendCompilerFailed)


def _compile_message(error: RuntimeError, device: torch.device) -> str:
    """One line for a failed compilation: the cause's first line and what the device needs."""
    cause = getattr(error, "inner_exception", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    reason = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    needs = ("a working C++ compiler" if device.type == "cpu"
             else "Triton (pip install triton)" if device.type == "cuda" else "its backend")
    return (f"train.compile: torch.compile could not compile the objective ({reason}); on "
            f"{device.type} it needs {needs}: install it or set train.compile=false")


def _kl_weight(cfg: config.ObjectiveConfig, step: int, epoch: int) -> float:
    return objectives.kl_weight(step, cfg.beta, cfg.warmup_steps, epoch=epoch,
                                warmup_epochs=cfg.warmup_epochs)


def train_epoch(loop: _Loop, epoch: int, state: dict[str, Any]) -> dict[str, Any]:
    """Train one epoch (0-based ``epoch``); return its record: lr, train objective, NELBO,
    recon and KL (sums over the epoch's examples / their number, all ranks), seconds.

    Raises:
        TrainingDiverged: a loss became NaN/Inf (names the term, step, epoch and batch), or
            a parameter did after an update.
    """
    cfg, ctx, device = loop.cfg, loop.ctx, loop.device
    seed, global_batch = cfg.train.seed, cfg.train.batch_size
    lr = learning_rate(cfg.train, epoch)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    loop.model.train()
    family = getattr(loop.model, "likelihood", None)
    started = time.perf_counter()
    n_train = len(loop.train_set)
    perm = torch.randperm(n_train, generator=seeded_generator(seed, epoch, Purpose.PERMUTATION))
    perm = perm.to(device)
    binarize_gen = seeded_generator(seed, epoch, Purpose.BINARIZE, device=device)
    # One noise stream for the global batch; under data parallelism every rank draws the
    # global batch's noise and keeps its slice (see global_batch_noise).
    noise_gen = seeded_generator(seed, epoch, Purpose.NOISE, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # objective, ELBO, recon, KL
    count, terms = 0, None
    steps = math.ceil(n_train / global_batch)
    batches = _progress(range(steps), f"epoch {epoch + 1}/{cfg.train.epochs}", loop.progress)
    first = state.get("first_objective")  # the untrained model's loss, the divergence yardstick
    limit = None if first is None else DIVERGENCE_FACTOR * max(abs(first), 1.0)
    with _data_checked(family):
        for batch in batches:
            runtime.follow_threads()  # another vaelab run started or ended: share the cores
            index = perm[batch * global_batch:(batch + 1) * global_batch]
            # Drawn for the global batch, so every rank sees the pixels of a one-process run.
            x = loop.train_set.inputs(index, loop.data_kind, binarize_gen)
            x = x.tensor_split(ctx.world_size)[ctx.rank]
            kl_weight = _kl_weight(cfg.objective, state["step"], epoch)
            if loop.compiled:  # a tensor: a new weight is an input, not a new graph
                kl_weight = torch.tensor(kl_weight, dtype=next(loop.model.parameters()).dtype,
                                         device=device)
            eps, gen = None, noise_gen
            if ctx.enabled or loop.compiled:  # the draws the objective would make, as a tensor
                eps = global_batch_noise(cfg.objective.samples, index.numel(),
                                         loop.model.latent_dim, noise_gen, device,
                                         next(loop.model.parameters()).dtype)
                eps, gen = eps.tensor_split(ctx.world_size, dim=1)[ctx.rank], None
            try:
                per_example, terms = train_step(
                    loop.objective, loop.optimizer, x, kl_weight=kl_weight, generator=gen,
                    eps=eps, batch_total=index.numel(), world_size=ctx.world_size,
                    grad_clip=cfg.train.grad_clip, explode_above=limit,
                    autocast=loop.autocast, scaler=loop.scaler)
            except _NonFinite as bad:
                raise TrainingDiverged(_nan_message(bad, state["step"], epoch, batch,
                                                    loop.run_dir, ctx)) from None
            except _Exploded as bad:
                raise TrainingDiverged(_exploded_message(bad, state, epoch, batch, cfg.train.lr,
                                                         loop.run_dir, ctx)) from None
            except RuntimeError as failed:
                if not (loop.compiled and _compile_failed(failed)):
                    raise
                raise ConfigError(_compile_message(failed, device)) from None
            if first is None:
                first = float(per_example.detach().sum()) * ctx.world_size / index.numel()
                state["first_objective"] = first
                limit = DIVERGENCE_FACTOR * max(abs(first), 1.0)
            state["step"] += 1
            count += per_example.numel()
            with torch.no_grad():  # one reduction for all four terms
                if terms is None:
                    sums[0] += per_example.sum(dtype=torch.float64)
                else:
                    sums += torch.stack((per_example, terms.elbo, terms.recon, terms.kl)
                                        ).sum(1, dtype=torch.float64)
            if loop.progress and batch % 20 == 0:
                batches.set_postfix(loss=f"{float(sums[0]) / count:.2f}")
    if not all(torch.isfinite(p).all() for p in loop.model.parameters()):
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1}: a parameter became NaN/Inf after an "
            f"optimizer step; the last good checkpoint is {loop.run_dir / 'checkpoints' / 'last'}"
            f": resume with a lower learning rate or set train.grad_clip"
        )
    totals = torch.cat((torch.tensor([float(count)], dtype=torch.float64, device=device), sums))
    n, objective_sum, elbo_sum, recon_sum, kl_sum = distributed.all_reduce_sum(totals, ctx).tolist()
    seconds = time.perf_counter() - started
    has_terms = terms is not None
    record = {
        "epoch": epoch + 1,
        "step": state["step"],
        "lr": lr,
        "precision": cfg.train.precision,  # which arithmetic trained the model (never silent)
        "train_objective": objective_sum / n,
        "train_nelbo": -elbo_sum / n if has_terms else None,
        "train_recon": -recon_sum / n if has_terms else None,  # -E log p(x|z)
        "train_kl": kl_sum / n if has_terms else None,
        "seconds": round(seconds, 3),
        "examples_per_second": round(n / seconds, 1),
    }
    if loop.scaler is not None:
        record["grad_scale"] = float(loop.scaler.get_scale())
    return record


@contextlib.contextmanager
def _data_checked(family: nn.Module | None) -> Iterator[None]:
    """Skip the likelihood's per-batch data check inside (the data were checked once)."""
    if family is None or not hasattr(family, "validate_data"):
        yield
        return
    family.validate_data = False
    try:
        yield
    finally:
        family.validate_data = True


def evaluate(loop: _Loop) -> dict[str, Any]:
    """The NELBO, recon and KL (beta = 1, the same z every epoch) of the split evaluated
    every epoch: ``val_*`` for the validation split, ``test_*`` with
    ``train.validation_split = test``; empty without one."""
    if loop.val_set is None or len(loop.val_set) == 0:
        return {}
    val = metrics.elbo_metrics(loop.model, loop.val_set, batch_size=loop.cfg.train.eval_batch_size,
                               seed=loop.cfg.train.seed, ctx=loop.ctx)
    prefix = "test" if loop.cfg.train.validation_split == "test" else "val"
    return {f"{prefix}_nelbo": val["nelbo"], f"{prefix}_recon": val["recon"],
            f"{prefix}_kl": val["kl"]}


# --------------------------------------------------------------------------- the run


def train_and_evaluate(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    ctx: distributed.Context | None = None,
    data: Splits | None = None,
) -> dict[str, Any]:
    """Train the model of ``cfg`` into ``run_dir``, evaluating on the validation split after
    every epoch; return a summary (run_dir, epochs, steps, best_epoch).

    Args:
        cfg: the resolved run configuration (saved as ``config.toml`` and in checkpoints).
        run_dir: where config, metrics, checkpoints and the sample grids go.
        resume: continue from ``run_dir/checkpoints/last`` (``cfg`` must match the saved
            config except for :data:`RESUMABLE_KEYS`).
        model: the model to train: your own (``encode``, ``decode``, ``prior``,
            ``latent_dim``; see :mod:`vaelab.objectives`; pass the same model again to
            resume), or the one ``cfg`` describes already built (seeded with
            ``torch.manual_seed(cfg.train.seed)`` just before, as here); default: built here.
        progress: show a tqdm bar (default: when stderr is a terminal).
        echo: where per-epoch lines go (default: ``print`` on rank 0).
        ctx: the process group (default: joined here when launched by torchrun, and left
            at the end).
        data: the run's splits (:class:`~vaelab.data.Splits`, on the training device), so
            that what is loaded here serves the report and figures after; default: loaded
            here.

    Raises:
        TrainingDiverged: a loss term became NaN/Inf (``last`` keeps the last good state).
        RunLocked, ConfigError, DataError, CheckpointError: bad input, one-line messages.
    """
    run_dir = Path(run_dir)
    device = runtime.select_device(cfg.train.device)
    own_group = ctx is None
    ctx = ctx if ctx is not None else distributed.setup(device)
    device = distributed.rank_device(device, ctx.local_rank) if ctx.enabled else device
    runtime.configure_threads(cfg.train.threads, device, ctx.local_world_size)
    if progress is None:
        progress = sys.stderr.isatty()
    echo = echo or (print if ctx.is_main else (lambda _line: None))
    with contextlib.ExitStack() as stack:
        if own_group:
            stack.callback(distributed.teardown, ctx)
        # Everything before the first training collective runs inside `agree`: an error on
        # any rank stops every rank with its message instead of leaving the others waiting.
        with distributed.agree(ctx, "setup"):
            loop, state = _setup(cfg, run_dir, resume, model, ctx, device,
                                 progress and ctx.is_main, stack, echo, data)
        # A failed collective from here on (a rank died or hangs) ends with a clear message.
        stack.enter_context(distributed.lost_contact(ctx, "training"))
        z_fixed = torch.randn(64, loop.model.latent_dim,
                              generator=seeded_generator(cfg.train.seed, 0, Purpose.SAMPLES))
        for epoch in range(state["epoch"], cfg.train.epochs):
            if state["stopped_early"]:
                break
            record = train_epoch(loop, epoch, state)
            record.update(evaluate(loop))
            _keep_best(state, record, cfg.train)
            if ctx.is_main:
                _save_epoch(loop, state, z_fixed.to(device))
            echo(_epoch_line(record, cfg.train.epochs))
            if state["stopped_early"]:
                echo(f"early stopping: no better validation ELBO for {cfg.train.patience} epochs")
        distributed.barrier(ctx)  # every file of rank 0 is written when any rank returns
    return {"run_dir": str(run_dir), "epochs": state["epoch"], "steps": state["step"],
            "best_epoch": state["best_epoch"]}


def _setup(cfg: RunConfig, run_dir: Path, resume: bool, model: nn.Module | None,
           ctx: distributed.Context, device: torch.device, progress: bool,
           stack: contextlib.ExitStack, echo: Callable[[str], None], data: Splits | None
           ) -> tuple[_Loop, dict[str, Any]]:
    """Checks, data, model, objective, optimizer, lock, state: everything before epoch 1."""
    _check_run_dir(cfg, run_dir, resume, ctx)  # writes nothing
    seed = cfg.train.seed
    # --- data: uint8 images stay in memory (on the device); floats are made per batch
    data = data if data is not None else Splits(cfg.data, seed, device)
    train_set = data["train"]
    if cfg.train.validation_split == "test":
        val_set = data["test"]
    elif cfg.data.validation_size:
        val_set = data["validation"]
    else:
        val_set = None
    if len(train_set) == 0:
        raise ConfigError("the training split is empty: use a larger dataset or train_limit")
    # --- model (seeded before construction: same seed, same weights) and objective
    if model is None:
        torch.manual_seed(seed)
        model = models.build_from_config(cfg, train_set.event_shape)
    model = model.to(device)
    if cfg.model.output_bias == "data-mean" and hasattr(model, "init_output_bias"):
        model.init_output_bias(train_set.pixel_mean().to(device))
    _check_likelihood_fits(model, cfg, train_set)
    _check_data_once(model, train_set, seed, device)
    if cfg.train.compile:
        _check_compilable(model, train_set, device)
    objective = objectives.build_objective(
        model, cfg.objective,
        (lambda t: distributed.sum_over_ranks(t, ctx)) if ctx.enabled else None)
    optimizer = make_optimizer(model, cfg.train, device)
    # --- mixed precision: float32 weights and optimizer state, autocast in the step
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    scaler = _grad_scaler(device) if amp_dtype == torch.float16 else None
    if amp_dtype == torch.bfloat16 and device.type == "cpu" and not _native_bf16():
        echo("vaelab: train.precision = bf16 on a CPU without bfloat16 instructions (no "
             "AVX512-BF16 or AMX): its bfloat16 matrix products have no fast kernel here and "
             "an epoch is several times slower than fp32 (docs/performance.md); use "
             "train.precision=fp32 here")
    # --- from here on we write: lock the run directory (rank 0 writes, others read)
    if ctx.is_main:
        stack.enter_context(run_lock(run_dir))
        if not resume and (run_dir / "checkpoints" / "last.json").exists():
            raise CheckpointError(f"{run_dir} already holds a run: continue it with --resume")
    state: dict[str, Any] = {
        "epoch": 0, "step": 0, "best_val_nelbo": None, "best_epoch": None,
        "epochs_since_best": 0, "history": [], "stopped_early": False, "first_objective": None,
    }
    recorded = None
    if resume:
        meta = checkpoint.load_checkpoint(run_dir / "checkpoints" / "last", model=model,
                                          optimizer=optimizer, map_location=device,
                                          restore_global_rng=True)
        state.update(meta["train_state"])
        # foreach / fused are this version's implementation choices, not hyperparameters:
        # load_state_dict brought back the checkpoint's (an older run's None: no foreach)
        for group in optimizer.param_groups:
            for key in ("foreach", "fused"):
                if key in optimizer.defaults:
                    group[key] = optimizer.defaults[key]
        if scaler is not None and meta.get("grad_scaler"):
            scaler.load_state_dict(meta["grad_scaler"])  # its scale and growth tracker
        recorded = (meta.get("numerics") or {}).get("threads")
        echo(f"resumed {run_dir} at epoch {state['epoch']}, step {state['step']}")
    # --- CPU threads: when the count can change this model's results, one count for the
    # whole run (resumes included) that does not depend on the machine's load
    numerics = runtime.training_threads(cfg.train.threads, model, device, ctx.local_world_size,
                                        recorded=recorded, compiled=cfg.train.compile)
    if ctx.is_main:
        atomic_write_text(run_dir / "config.toml", config.to_toml(cfg))
    # --- data parallelism: DDP averages gradients over ranks (and first copies rank 0's
    # weights to every rank); each rank computes the objective on its shard of the batch.
    wrapped: nn.Module = objective
    if ctx.enabled:
        with distributed.lost_contact(ctx, "setup"):
            wrapped = nn.parallel.DistributedDataParallel(
                objective, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        wrapped = _compiled(wrapped)
    loop = _Loop(cfg, model, wrapped, optimizer, train_set, val_set, ctx, device, run_dir,
                 progress, amp_dtype, scaler, compiled=cfg.train.compile)
    state["data"] = {"train": train_set.metadata,
                     "validation": val_set.metadata if val_set is not None else None}
    state["numerics"] = numerics
    return loop, state


def _check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, ctx: distributed.Context) -> None:
    """A resume needs a run whose config matches; a new run needs an unused directory."""
    last = run_dir / "checkpoints" / "last"
    if resume:
        if not last.with_suffix(".json").is_file():
            raise CheckpointError(
                f"nothing to resume in {run_dir}: no checkpoints/last.json (start a new run "
                "with --out instead)" + _shared_fs_hint(ctx))
        saved = config.from_dict(checkpoint.read_meta(last)["config"], saved=True)
        _check_resume_config(saved, cfg)
    elif ctx.is_main and last.with_suffix(".json").exists():
        raise CheckpointError(f"{run_dir} already holds a run: continue it with --resume "
                              f"{run_dir} or choose another --out")


def _check_likelihood_fits(model: nn.Module, cfg: RunConfig, train_set: ImageSet) -> None:
    """A density on [0, 1] (gaussian, laplace, continuous-bernoulli) is no likelihood of
    0/1 values: on binarised data it can grow without bound. Refuse that pairing."""
    family = getattr(model, "likelihood", None)
    binarised = cfg.data.binarize != "none" or train_set.levels == 2
    if (getattr(family, "data_kind", None) == "unit" and getattr(family, "normalized", True)
            and binarised):
        raise ConfigError(
            f"likelihood {family.name} is a density on [0, 1] but the data are binarised "
            f"(0/1 values, binarize = {cfg.data.binarize}): a density on 0/1 values is not a "
            "likelihood of them and grows without bound; use --binarize none (grey levels) "
            "or --likelihood bernoulli")


def _check_data_once(model: nn.Module, train_set: ImageSet, seed: int,
                     device: torch.device) -> None:
    """Check the data against the likelihood once, up front (a clear error, not a NaN
    later); every batch has the same kind of values, so the loop skips the check."""
    family = getattr(model, "likelihood", None)
    if family is None or not hasattr(family, "validate"):
        return
    index = torch.arange(min(len(train_set), 1024), device=device)
    gen = seeded_generator(seed, 0, Purpose.BINARIZE, device=device)
    family.validate(train_set.inputs(index, family.data_kind, gen))


def _keep_best(state: dict[str, Any], record: dict[str, Any], cfg: config.TrainConfig) -> None:
    """Update the best epoch (``train.select``: the lowest validation NELBO, or every epoch
    with ``last`` or without validation) and the early-stopping counter; append ``record``
    to the history."""
    best, patience = state["best_val_nelbo"], cfg.patience
    improved = (cfg.select == "last" or "val_nelbo" not in record or best is None
                or record["val_nelbo"] < best)
    if improved:
        state.update(best_val_nelbo=record.get("val_nelbo"), best_epoch=record["epoch"],
                     epochs_since_best=0)
    else:
        state["epochs_since_best"] += 1
    state["improved"] = improved
    if patience is not None and state["epochs_since_best"] >= patience:
        state["stopped_early"] = True
    state["epoch"] = record["epoch"]
    state["history"].append(record)


def _save_epoch(loop: _Loop, state: dict[str, Any], z_fixed: torch.Tensor) -> None:
    """Rank 0's files of an epoch: ``best`` (if improved), ``metrics.jsonl``, the sample grid,
    then ``last`` (the resume point, so a kill before it re-runs this epoch bitwise)."""
    ckpt_dir = loop.run_dir / "checkpoints"
    train_state = {k: v for k, v in state.items() if k not in ("data", "improved", "numerics")}
    meta = {"config": config.to_dict(loop.cfg), "train_state": train_state,
            "data": state["data"], "event_shape": list(loop.train_set.event_shape),
            "world_size": loop.ctx.world_size, "numerics": state["numerics"]}
    if state["improved"]:
        checkpoint.save_checkpoint(ckpt_dir / "best", model=loop.model, meta=meta)
    text = "".join(json.dumps(r) + "\n" for r in state["history"])
    atomic_write_text(loop.run_dir / "metrics.jsonl", text)
    with torch.no_grad():
        loop.model.eval()
        means = loop.model.decode(z_fixed).mean
        loop.model.train()
    grids.save_image_grid(means, loop.run_dir / "figures" / "samples"
                          / f"epoch-{state['epoch']:03d}.png", nrow=grids.grid_columns(len(means)))
    if loop.scaler is not None:  # plain numbers (scale, growth tracker, factors)
        meta["grad_scaler"] = loop.scaler.state_dict()
    checkpoint.save_checkpoint(ckpt_dir / "last", model=loop.model, optimizer=loop.optimizer,
                               meta=meta)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on ``run_dir`` (released when the process exits, even by kill -9)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115
    try:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - non-POSIX: best effort
            pass
        except OSError:
            raise RunLocked(
                f"run directory {run_dir} is in use by another vaelab process: "
                "wait for it to finish or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def _check_resume_config(saved: RunConfig, requested: RunConfig) -> None:
    for key, (a, b) in _differences(config.to_dict(saved), config.to_dict(requested)).items():
        section = key.split(".")[0]
        resumable = RESUMABLE_KEYS.get(section, set())
        if "*" not in resumable and key.split(".", 1)[1] not in resumable:
            raise ConfigError(
                f"cannot change {key} from {a!r} to {b!r} when resuming: "
                "start a new run with --out instead"
            )


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple]:
    """Dotted key -> (value in a, value in b) wherever the nested dicts differ."""
    out: dict[str, tuple] = {}
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_differences(x, y, name + "."))
        elif x != y and key != "preset":
            out[name] = (x, y)
    return out


def _nan_message(bad: _NonFinite, step: int, epoch: int, batch: int, run_dir: Path,
                 ctx: distributed.Context) -> str:
    where = f" on rank {ctx.rank} of {ctx.world_size}" if ctx.enabled else ""
    terms, loss = bad.terms, bad.per_example
    if terms is None:
        term, nonfinite = "IWAE bound", ~torch.isfinite(loss)
    elif not torch.isfinite(terms.recon).all():
        term, nonfinite = "reconstruction", ~torch.isfinite(terms.recon)
    elif not torch.isfinite(terms.kl).all():
        term, nonfinite = "KL", ~torch.isfinite(terms.kl)
    else:
        term, nonfinite = "loss", ~torch.isfinite(loss)
    return (
        f"training diverged{where} at step {step} (epoch {epoch + 1}, batch {batch}): "
        f"the {term} term is NaN/Inf for {int(nonfinite.sum())} of {nonfinite.numel()} "
        f"examples; the last good checkpoint is {run_dir / 'checkpoints' / 'last'}: resume "
        f"with a lower learning rate, e.g. vaelab train --resume {run_dir} --set train.lr=1e-4"
    )


def _exploded_message(bad: _Exploded, state: dict[str, Any], epoch: int, batch: int,
                      lr: float, run_dir: Path, ctx: distributed.Context) -> str:
    where = f" on rank {ctx.rank} of {ctx.world_size}" if ctx.enabled else ""
    lower = min(lr / 10, 1e-3)
    if state["epoch"]:
        keep = (f"the last good checkpoint is {run_dir / 'checkpoints' / 'last'} (epoch "
                f"{state['epoch']}): resume with a lower learning rate, e.g. vaelab train "
                f"--resume {run_dir} --set train.lr={lower:g}")
    else:
        keep = ("no checkpoint was written (it diverged in the first epoch): start again with "
                f"a lower learning rate, e.g. --set train.lr={lower:g}")
    return (f"training diverged{where} at step {state['step']} (epoch {epoch + 1}, batch "
            f"{batch}): the objective reached {bad.value:.4g} nats per example, more than "
            f"{DIVERGENCE_FACTOR:g} times its first value ({state['first_objective']:.4g}); the "
            f"learning rate is {lr:g}: {keep}")


def _shared_fs_hint(ctx: distributed.Context) -> str:
    if not ctx.enabled or ctx.is_main:
        return ""
    return (f"; rank {ctx.rank} cannot see it: with several nodes the run directory must be "
            "on a file system that every node shares")


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}"]
    if record.get("train_nelbo") is not None:
        parts.append(f"train nelbo {record['train_nelbo']:.2f}")
    else:
        parts.append(f"train objective {record['train_objective']:.2f}")
    for prefix in ("val", "test"):
        if f"{prefix}_nelbo" in record:
            parts.append(f"{prefix} nelbo {record[f'{prefix}_nelbo']:.2f} (recon "
                         f"{record[f'{prefix}_recon']:.2f} + kl {record[f'{prefix}_kl']:.2f})")
    parts.append(f"{record['seconds']:.1f} s ({record['examples_per_second']:.0f} ex/s)")
    return " | ".join(parts)
