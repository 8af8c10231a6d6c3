"""ONNX graphs of a trained model's encoder and decoder (``pip install 'vaelab[onnx]'``).

``encoder.onnx``: input ``x`` ``(B, *event_shape)`` float32 in [0, 1] (8-bit data divided by
255, as the model's encoder sees it); outputs ``qz_loc`` and ``qz_scale`` ``(B, L)`` of the
diagonal Gaussian q(z|x) (with a posterior flow, its base), and ``flow_params`` ``(B, P)``
when the model has a flow.

A posterior flow with weights of its own (``iaf``: its MADEs are model parameters, not
encoder outputs) is refused: ``encoder.onnx`` would not describe q(z|x).

``decoder.onnx``: input ``z`` ``(N, L)``; outputs ``px_params``, the decoder's raw output that
parameterises p(x|z) (e.g. Bernoulli logits, ``(N, P * C, *rest)``), and ``px_mean``
``(N, *event_shape)``, the likelihood's mean in data units.

Both are exported with ``torch.onnx.export(..., dynamo=True)`` with a dynamic batch size and
checked right away by onnxruntime (part of the extra): each graph's outputs on a batch of
another size must match torch's within ``tolerance`` (1e-5 by default), or the file is
removed and an error says by how much they differ.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import VaelabError

__all__ = ["export_onnx", "require_onnx", "refuse_own_flow_weights", "ONNX_EXTRA"]

ONNX_EXTRA = "pip install 'vaelab[onnx]'"


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loc, scale, params = self.model._encoded(x)
        return (loc, scale) if params is None else (loc, scale, params)


class _Decoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.model.decoder(z)
        return params, self.model.likelihood(params).mean


def require_onnx() -> None:
    """VaelabError naming the extra unless onnx, onnxscript and onnxruntime import (the
    graphs are always checked against onnxruntime, never written unchecked)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise VaelabError(f"ONNX export needs onnx, onnxscript and onnxruntime ({err.name} is "
                          f"missing): {ONNX_EXTRA}") from None


def refuse_own_flow_weights(model: nn.Module) -> None:
    """VaelabError unless the model's posterior flow (if any) is a function of the encoder's
    outputs alone: the graphs hold no flow, so a flow with weights of its own (the IAF's
    MADEs) would be lost and ``encoder.onnx`` would not describe q(z|x)."""
    flow = getattr(model, "flow", None)
    if flow is not None and next(flow.parameters(), None) is not None:
        name = getattr(flow, "name", type(flow).__name__)
        raise VaelabError(f"ONNX export of a model with posterior.flow = {name} is not "
                          "supported: the flow's weights are not in encoder.onnx, so its "
                          "outputs would not describe q(z|x); share the weights "
                          "(model.safetensors) without --onnx, or export a model with "
                          "posterior.flow = none or planar")


def export_onnx(model: nn.Module, out_dir: str | Path, *, tolerance: float = 1e-5,
                opset: int | None = None) -> list[Path]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` of a vaelab ``model`` into ``out_dir``
    and check them against torch (onnxruntime, when installed).

    Returns:
        the two paths.

    Raises:
        VaelabError: the model's posterior flow has weights of its own (``iaf``), the onnx
            packages are missing, the export failed, or onnxruntime's outputs differ from
            torch's by more than ``tolerance``.
    """
    refuse_own_flow_weights(model)
    require_onnx()
    out_dir = Path(out_dir)
    model = copy.deepcopy(model).eval().to("cpu")  # the caller's model stays as it is
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((3, *model.event_shape), generator=gen)
    z = torch.randn(5, model.latent_dim, generator=gen)
    has_flow = getattr(model, "flow", None) is not None
    graphs = [
        (_Encoder(model).eval(), x, "encoder.onnx", "x",
         ["qz_loc", "qz_scale"] + (["flow_params"] if has_flow else [])),
        (_Decoder(model).eval(), z, "decoder.onnx", "z", ["px_params", "px_mean"]),
    ]
    written = []
    for module, example, name, input_name, outputs in graphs:
        path = out_dir / name
        batch = torch.export.Dim("batch", min=1)
        try:
            with _quiet_exporter(), torch.no_grad():
                torch.onnx.export(module, (example,), path, dynamo=True, external_data=False,
                                  input_names=[input_name], output_names=outputs,
                                  dynamic_shapes={input_name: {0: batch}}, opset_version=opset,
                                  verbose=False)
        except Exception as err:  # the exporter raises many kinds; say which part failed
            path.unlink(missing_ok=True)
            raise VaelabError(f"ONNX export of the {name[:-5]} failed "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                              ) from None
        written.append(path)
        # a second batch size proves the batch dimension is dynamic
        probe = torch.cat([example, example[:1]])
        _check(module, probe, path, input_name, tolerance)
    return written


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines, its note that torchvision's ops are not registered and
    its deprecation warnings are not the user's business."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _check(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
           tolerance: float) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {input_name: example.numpy()})
    with torch.no_grad():
        expected = module(example)
    for out, ref, meta in zip(got, expected, session.get_outputs()):
        diff = float((torch.from_numpy(out) - ref).abs().max())
        if not diff <= tolerance:
            path.unlink(missing_ok=True)
            raise VaelabError(f"{path.name}'s output {meta.name} differs from torch's by "
                              f"{diff:.3g} (tolerance {tolerance:g}): report this model kind "
                              "as an ONNX export bug")
