"""What a hand-written VAE loss really optimises (``vaelab audit``).

- :func:`explain` relates a loss described by its parts (reconstruction error and
  reductions, KL reduction and weight, batch reduction) to the per-example negative ELBO:
  scale, effective beta, the likelihood it implies, the constant it drops.
- :func:`probe` finds that description by calling the loss function itself on designed
  inputs (:mod:`vaelab.audit.probe`), for PyTorch, NumPy and Keras 3 code.
- :mod:`vaelab.audit.presets`: faithful re-implementations of widely copied losses, with
  their sources; :mod:`vaelab.audit.load` loads a user's function (this runs their code).

Modules: ``explain`` (the model of a loss and the text), ``probe`` (the measurements),
``forms`` (the elementwise forms a loss is matched against), ``frameworks`` (NumPy, torch
and Keras inputs and outputs), ``load``, ``presets``, ``commands`` (what the CLI prints).
"""

from __future__ import annotations

from .explain import RECON_LOSSES, Audit, ReconLoss, explain, probe

__all__ = ["RECON_LOSSES", "Audit", "ReconLoss", "explain", "probe"]
