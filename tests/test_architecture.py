"""The shape of the package: one direction of imports, no cycles (imports inside functions
counted), evaluation/plots/run loading never import the trainer, and own models work with
every downstream piece without the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

import vaelab
from vaelab import evaluate, likelihoods, metrics, objectives, plots

PACKAGE = Path(vaelab.__file__).resolve().parent

#: The layers, lowest first: a module may import only from its own layer or lower ones.
LAYERS = [
    {"errors", "registry", "_io", "rng", "schedules", "psis", "threads", "options",
     "allocator"},
    {"runtime", "distributed"},
    {"likelihoods", "priors", "posteriors", "compat", "audit"},
    {"models"},
    {"objectives"},
    {"estimators"},
    {"config"},  # reads the registries below for each kind's options
    {"data"},
    {"metrics", "checkpoint", "grids", "onnx_export"},
    {"train", "runs", "keras"},
    {"hub"},  # export / from_pretrained / push: opens runs, writes folders  # keras: the Keras side of the loss, and Keras -> vaelab
    {"evaluate"},
    {"plots"},
    {"experiment"},
    {"explore"},  # opens a run through the pipeline; only the CLI imports it
    {"cli", "__main__"},
]


def _top(module: str) -> str:
    return module.split(".")[0]


def import_graph() -> dict[str, set[str]]:
    """``{top-level module: top-level modules it imports}`` from every ``import`` statement
    anywhere in the package (module level and inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts)
        is_package = parts[-1] == "__init__"
        here = parts[:-1] if is_package or len(parts) > 1 else ()
        if is_package:
            here = parts[:-1]
        deps = graph.setdefault(_top(name), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = list(here if not is_package else parts[:-1])
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                if node.module:
                    deps.add(_top(".".join([*base, node.module])))
                else:
                    deps.update(_top(".".join([*base, a.name])) for a in node.names)
            elif isinstance(node, ast.Import):  # noqa: SIM102
                for alias in node.names:
                    if alias.name.startswith("vaelab."):
                        deps.add(_top(alias.name.split(".", 1)[1]))
    for name, deps in graph.items():
        deps.discard(name)
        deps.discard("__init__")  # `from . import __version__`
    return graph


def test_every_module_is_in_a_layer():
    placed = set().union(*LAYERS)
    assert set(import_graph()) - {"__init__"} <= placed, set(import_graph()) - placed


def test_imports_go_down_the_layers_only():
    rank = {module: i for i, layer in enumerate(LAYERS) for module in layer}
    upward = [(a, b) for a, deps in import_graph().items() if a in rank
              for b in deps if b in rank and rank[b] > rank[a]]
    assert upward == [], f"modules importing a higher layer: {upward}"


def test_no_import_cycles():
    graph = import_graph()
    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in seen:
                visit(nxt, [*stack, node])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [])


def test_downstream_never_imports_the_trainer():
    graph = import_graph()
    for module in ("evaluate", "plots", "runs", "metrics"):
        assert "train" not in graph[module], module


def test_help_does_not_import_torch():
    code = ("import sys; from vaelab.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- own models


class TinyVAE(nn.Module):
    """A user's own model: no vaelab base class, no decoder.output_layer, no likelihood
    attribute; just the four members of the protocol (docs/design.md)."""

    latent_dim = 2

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 4)
        self.dec = nn.Linear(2, 6)
        self.family = likelihoods.get("bernoulli")

    def encode(self, x):
        loc, raw = self.enc(x.flatten(1)).chunk(2, -1)
        return Independent(Normal(loc, nn.functional.softplus(raw) + 1e-4), 1)

    def decode(self, z):
        return self.family(self.dec(z).view(-1, 1, 2, 3))

    def prior(self, device=None):
        zero = torch.zeros(2, device=device)
        return Independent(Normal(zero, torch.ones_like(zero)), 1)


@pytest.fixture()
def own():
    torch.manual_seed(0)
    x = (torch.rand(40, 1, 2, 3, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    return TinyVAE(), x


def test_metrics_and_report_take_a_tensor_or_batches(own):
    model, x = own
    from_tensor = metrics.elbo_metrics(model, x, batch_size=16)
    from_batches = metrics.elbo_metrics(model, list(x.split(16)), batch_size=16)
    assert from_tensor == from_batches and from_tensor["n"] == 40
    nll = metrics.nll_metrics(model, [(b, None) for b in x.split(16)], samples=30,
                              per_example=True)
    assert nll["per_example_nll"].shape == (40,)
    assert nll["nll"] == pytest.approx(float(nll["per_example_nll"].mean()), rel=1e-12)
    report = evaluate.evaluate(model, x, iw_samples=30, batch_size=16)
    assert report["dataset"] == "tensor" and report["n_examples"] == 40
    assert report["nll"] == pytest.approx(nll["nll"], rel=1e-12)  # same seeds, same batches
    assert report["nll"] <= report["nelbo"] + 3 * report["nelbo_stderr"]


def test_elbo_metrics_encode_each_batch_once(own, monkeypatch):
    """The per-epoch evaluation reuses the ELBO's q(z|x) for the latent means: one encoder
    pass per batch, and the NELBO is the seeded ELBO's, batch by batch."""
    from vaelab.rng import Purpose, seeded_generator

    model, x = own
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda batch: calls.append(len(batch)) or encode(batch))
    got = metrics.elbo_metrics(model, x, batch_size=16, seed=3)
    assert calls == [16, 16, 8]
    with torch.no_grad():
        elbo = torch.cat([objectives.elbo_terms(
            model, b, generator=seeded_generator(3, n, Purpose.EVAL_NOISE)).elbo
            for n, b in enumerate(x.split(16))])
        loc = encode(x).mean.double()
    assert got["nelbo"] == pytest.approx(-float(elbo.double().mean()), rel=1e-12)
    assert got["latent_variance"] == pytest.approx(loc.var(0).tolist(), rel=1e-9)


def test_figure_functions_take_tensors(own, tmp_path):
    model, x = own
    with torch.no_grad():
        loc = model.encode(x).mean
        recon = model.decode(loc).mean
    kl = torch.tensor([0.5, 2.0], dtype=torch.float64)
    figures = {
        "reconstructions": plots.reconstructions_figure(x[:8], recon[:8], title="own"),
        "manifold": plots.manifold_figure(model, kl, title="own"),
        "scatter": plots.latent_scatter_figure(loc, torch.arange(40) % 3, ["a", "b", "c"]),
        "kl": plots.kl_per_dim_figure(kl, torch.tensor([0.5, 0.001])),
        "traversals": plots.traversals_figure(model, loc[0], kl),
        "curves": plots.training_curves_figure([{"epoch": 1, "train_nelbo": 5.0},
                                                {"epoch": 2, "train_nelbo": 4.0}]),
    }
    for name, fig in figures.items():
        assert plots.save_figure(fig, tmp_path / f"{name}.png").stat().st_size > 1000


def test_own_model_trains_without_the_cli(own, tmp_path):
    from vaelab import config
    from vaelab.train import train_and_evaluate

    model, x = own
    data = tmp_path / "own.npz"
    import numpy as np

    np.savez(data, images=(x.numpy() * 255).astype(np.uint8))
    cfg = config.resolve(overrides=[f"data.dataset={data}", "data.validation_size=8",
                                    "data.layout=nchw",
                                    "data.binarize=none", "train.epochs=2",
                                    "train.batch_size=8", "train.device=cpu"])
    before = [p.detach().clone() for p in model.parameters()]
    summary = train_and_evaluate(cfg, tmp_path / "run", model=model, progress=False,
                                 echo=lambda _line: None)
    assert summary["epochs"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    from vaelab.runs import open_run

    again = open_run(tmp_path / "run", "last", model=TinyVAE())
    for a, b in zip(model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    assert objectives.elbo_terms(again.model, x).elbo.shape == (40,)
