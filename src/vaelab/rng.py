"""Randomness as a pure function of ``(seed, epoch or batch number, purpose)``.

Every random draw in training, evaluation and the figures comes from a generator made
here, never from torch's global RNG (the one exception: the initial weights, drawn from the
global RNG seeded with the run's seed right before the model is built; see
:mod:`vaelab.models.init`). So a run resumed at an epoch boundary continues
bitwise, evaluation numbers do not depend on how many processes share the work, and
changing one use of randomness never shifts another (each use has its own
:class:`Purpose`).

    gen = seeded_generator(seed, epoch, Purpose.PERMUTATION)
    perm = torch.randperm(n, generator=gen)
"""

from __future__ import annotations

import enum

import numpy as np
import torch

__all__ = ["Purpose", "seeded_generator"]


class Purpose(enum.IntEnum):
    """What a generator is for. The values are part of every run's reproducibility:
    never renumber them (a new use gets a new number)."""

    PERMUTATION = 1  #: training: the epoch's shuffle
    BINARIZE = 2  #: training: dynamic binarisation of the epoch's batches
    NOISE = 3  #: training: the reparameterisation noise of the epoch
    SAMPLES = 4  #: the fixed z of the per-epoch sample grids and samples.png
    EVAL_NOISE = 11  #: evaluation: the ELBO's z of batch ``number``
    EVAL_BINARIZE = 12  #: evaluation: dynamic binarisation of batch ``number``
    EVAL_IW = 13  #: evaluation: the importance samples of batch ``number``
    EVAL_AIS = 14  #: evaluation: the AIS chains of batch ``number``
    EVAL_BDMC = 15  #: evaluation: BDMC's simulated data and chains of batch ``number``
    EVAL_CHECK = 16  #: evaluation: which examples AIS checks, and its chains per group
    FIGURE_BINARIZE = 21  #: figures: binarisation of the encoded test images
    SAMPLE_DRAW = 22  #: ``vaelab sample``: z and the samples of p(x|z)
    EXPLORE = 23  #: ``vaelab explore``: a clicked test example's ELBO draws and IS samples


def seeded_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` whose state is a pure function of ``(seed, *keys)``.

    The 64-bit torch seed is drawn from ``numpy.random.SeedSequence([seed, *keys])``, so
    nearby keys give unrelated streams.
    """
    state = np.random.SeedSequence([seed, *(int(k) for k in keys)]).generate_state(
        2, dtype=np.uint32)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen
