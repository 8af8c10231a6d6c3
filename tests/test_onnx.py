"""ONNX export (vaelab.onnx_export): each model kind's encoder and decoder graphs against
onnxruntime, within 1e-5 of torch, with a batch size other than the one exported."""

from __future__ import annotations

import pytest
import torch

from vaelab import config, models
from vaelab.errors import VaelabError

onnxruntime = pytest.importorskip("onnxruntime", reason="pip install 'vaelab[onnx]'")
pytest.importorskip("onnxscript", reason="pip install 'vaelab[onnx]'")

from vaelab.onnx_export import export_onnx  # noqa: E402

#: (event shape, overrides): the MLP with Bernoulli logits; a gated MLP with a Gaussian of
#: learned scale and a planar flow (its parameters are an encoder output); the conv model on
#: colour images with the 8-bit discretised logistic mixture.
CASES = {
    "mlp-bernoulli": ((1, 28, 28), ["model.latent_dim=3", "model.hidden=32"]),
    "gated-gaussian-planar": ((1, 8, 8), [
        "model.latent_dim=2", "model.hidden=16,16", "model.mlp.gated=true",
        "likelihood.name=gaussian", "data.binarize=none", "posterior.flow=planar",
        "posterior.planar.length=3"]),
    "conv-logistic-mixture": ((3, 16, 16), [
        "model.kind=conv", "model.latent_dim=8", "likelihood.name=discretized-logistic-mixture",
        "data.binarize=none", "model.conv.channels=8,16"]),
}


def _model(overrides: list[str], event_shape: tuple[int, ...]) -> torch.nn.Module:
    cfg = config.resolve(overrides=overrides)
    torch.manual_seed(0)
    return models.build_from_config(cfg, event_shape).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each case's model and its exported (encoder, decoder) paths, made once."""
    made = {}
    for case, (event_shape, overrides) in CASES.items():
        model = _model(overrides, event_shape)
        made[case] = model, export_onnx(model, tmp_path_factory.mktemp(case))
    return made


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_graphs_match_torch(case, exports):
    event_shape = CASES[case][0]
    model, (encoder, decoder) = exports[case]
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((2, *event_shape), generator=gen)
    z = torch.randn(7, model.latent_dim, generator=gen)

    session = onnxruntime.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    loc, scale, params = model._encoded(x)
    expected = {"qz_loc": loc, "qz_scale": scale}
    if params is not None:
        expected["flow_params"] = params
    assert names == list(expected)
    for name, out in zip(names, session.run(None, {"x": x.numpy()})):
        torch.testing.assert_close(torch.from_numpy(out), expected[name].detach(),
                                   atol=1e-5, rtol=0)

    session = onnxruntime.InferenceSession(str(decoder), providers=["CPUExecutionProvider"])
    raw, mean = session.run(None, {"z": z.numpy()})
    with torch.no_grad():
        px = model.decode(z)
        torch.testing.assert_close(torch.from_numpy(raw), model.decoder(z), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(mean), px.mean, atol=1e-5, rtol=0)
    assert mean.shape == (7, *event_shape)


def test_a_mismatch_removes_the_file_and_says_by_how_much(exports, tmp_path):
    import copy
    import shutil

    from vaelab import onnx_export

    model, (_, exported) = exports["mlp-bernoulli"]
    model, decoder = copy.deepcopy(model), tmp_path / "decoder.onnx"
    shutil.copyfile(exported, decoder)
    with torch.no_grad():  # torch's side differs from the graph by exactly 1e-3
        model.decoder[-2].bias += 1e-3
    z = torch.randn(4, model.latent_dim)
    with pytest.raises(VaelabError, match=r"decoder.onnx's output px_params differs from "
                                          r"torch's by 0.001 \(tolerance 1e-05\)"):
        onnx_export._check(onnx_export._Decoder(model).eval(), z, decoder, "z", 1e-5)
    assert not decoder.exists()


def test_a_flow_with_weights_of_its_own_is_refused_and_nothing_is_written(tmp_path):
    """The IAF's MADE weights are model parameters, not encoder outputs: encoder.onnx would
    not describe q(z|x), so the export says so in one line and writes nothing."""
    model = _model(["model.latent_dim=2", "model.hidden=16", "posterior.flow=iaf",
                    "posterior.iaf.hidden=8"], (1, 8, 8))
    with pytest.raises(VaelabError) as err:
        export_onnx(model, tmp_path)
    message = str(err.value)
    assert message.startswith("ONNX export of a model with posterior.flow = iaf is not "
                              "supported: the flow's weights are not in encoder.onnx")
    assert "posterior.flow = none or planar" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []
