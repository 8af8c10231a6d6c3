r"""Learning-rate schedules (a registry): the learning rate of each epoch.

A schedule is a pure function ``(base_lr, epoch, config) -> lr`` of the 0-based epoch, so
a run resumed at an epoch boundary continues with exactly the rate it would have had.
``config`` is the run's :class:`~vaelab.config.TrainConfig` (read for ``epochs``,
``lr_milestones`` and ``lr_gamma``). Select one with ``train.lr_schedule``:

=============  =====================================================================
``constant``   ``lr`` at every epoch
``cosine``     :math:`\tfrac{lr}{2}(1 + \cos(\pi e / E))` over ``E = epochs``
``iwae``       Burda et al. (2016): :math:`3^i` epochs at :math:`lr \cdot 10^{-i/7}`,
               ``i = 0..7`` (3,280 epochs in all)
``multistep``  PyTorch's ``MultiStepLR`` stepped once per epoch:
               :math:`lr \cdot \gamma^{\#\{m \in \text{milestones}: m \le e\}}`
=============  =====================================================================

This module imports no torch, so the configuration can check names without it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

from .registry import Registry

__all__ = ["SCHEDULES", "learning_rate"]

Schedule = Callable[[float, int, Any], float]

SCHEDULES: Registry[Schedule] = Registry("learning-rate schedule")


@SCHEDULES.register("constant")
def _constant(lr: float, epoch: int, cfg: Any) -> float:
    return lr


@SCHEDULES.register("cosine")
def _cosine(lr: float, epoch: int, cfg: Any) -> float:
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


@SCHEDULES.register("iwae")
def _iwae(lr: float, epoch: int, cfg: Any) -> float:
    stage, end = 0, 1
    while epoch >= end:
        stage += 1
        end += 3**stage
    return lr * 10.0 ** (-stage / 7.0)


@SCHEDULES.register("multistep")
def _multistep(lr: float, epoch: int, cfg: Any) -> float:
    # After `epoch` calls of MultiStepLR.step() the rate is lr * gamma^bisect_right(...).
    milestones = sorted(cfg.lr_milestones)
    return lr * cfg.lr_gamma ** bisect.bisect_right(milestones, epoch)


def learning_rate(cfg: Any, epoch: int) -> float:
    """The learning rate of 0-based ``epoch`` for the ``TrainConfig`` ``cfg``.

    Raises:
        ConfigError: an unknown ``cfg.lr_schedule`` (the message lists the valid ones).
    """
    return SCHEDULES[cfg.lr_schedule](cfg.lr, epoch, cfg)
