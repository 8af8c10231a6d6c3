"""Binarisation applied when a split is loaded (``binarize="static"``, and the test split of
``"dynamic"``); ``"dynamic"`` draws of train/validation happen per batch in
:meth:`vaelab.data.ImageSet.batch`."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .imageset import bernoulli_binarize, derive_seed

__all__ = ["TEST_BINARIZATION_SEED", "binarize_images"]

TEST_BINARIZATION_SEED = 0


def binarize_images(
    images: torch.Tensor,
    levels: int,
    binarize: str,
    split: str,
    seed: int,
    part: str,
    official_binary: bool,
) -> tuple[torch.Tensor, int, str, dict[str, Any]]:
    """Apply the binarisation that happens at load time; return images, levels, mode, metadata.

    ``images`` are a whole official part (or a whole user file): static draws are a function
    of ``(seed, part)`` and of each image's position in it, so every split carved out of
    the part sees the same draw.
    """
    if levels == 2:
        if binarize == "dynamic":
            raise ConfigError(
                "this data is already binary (0/1): dynamic binarisation would change nothing; "
                "use binarize='static' or 'none'"
            )
        if official_binary:
            return images, 2, "static", {
                "mode": "static", "requested": binarize,
                "draw": "the dataset's official fixed binarisation (for binarized-mnist: "
                        "Larochelle & Murray, 2011)"}
        return images, 2, binarize, {"mode": binarize, "draw": "data stored as 0/1"}
    if binarize == "none":
        return images, 256, "none", {"mode": "none"}
    if binarize == "dynamic" and split != "test":
        return images, 256, "dynamic", {
            "mode": "dynamic",
            "draw": "b < images, b uniform on 0..254 (the bytes of the run's generator's 64-bit "
                    "draws, 255 rejected) at every batch(): exactly Bernoulli(images / 255)"}
    draw_seed = seed if binarize == "static" else TEST_BINARIZATION_SEED
    generator_seed = derive_seed(draw_seed, f"static:{part}")
    meta = {
        "mode": "static", "requested": binarize, "seed": draw_seed, "part": part,
        "generator_seed": generator_seed,
        "draw": f"bernoulli_binarize(official {part} part, derive_seed({draw_seed}, "
                f"'static:{part}')): one fixed draw u < grey/255",
    }
    if binarize == "dynamic":
        meta["note"] = ("dynamic binarisation: test data binarised once with the fixed seed "
                        f"{TEST_BINARIZATION_SEED} (same as binarize='static', seed=0)")
    return bernoulli_binarize(images, generator_seed), 2, "static", meta
