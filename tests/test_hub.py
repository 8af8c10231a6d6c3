"""Export, strict loading and push (vaelab.hub): a folder round trip, the Hub cache offline,
a fake Hub on 127.0.0.1, the model card's numbers, and every bad input refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_overrides, train
from vaelab import checkpoint, config, hub, runs
from vaelab.cli import main
from vaelab.errors import CheckpointError, VaelabError

yaml = pytest.importorskip("yaml", reason="PyYAML reads the card's front matter in this test")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_available):
    out = tmp_path_factory.mktemp("hub") / "run"
    cfg = config.resolve(overrides=tiny_overrides())
    train(cfg, out)
    return out


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    return hub.export_run(run_dir, tmp_path_factory.mktemp("export") / "model",
                          license="mit")


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- round trip


def test_folder_round_trip_is_bit_for_bit(run_dir, exported):
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md", "config.json", "metrics.jsonl", "model.safetensors", "report.json",
        "train-config.toml"]
    original = runs.open_run(run_dir, "best").model
    loaded = hub.from_pretrained(exported)
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not loaded.training
    # the weights file holds tensors only, under the state dict's own keys
    assert set(load_file(exported / "model.safetensors")) == set(a)
    record = json.loads((exported / "config.json").read_text())
    assert record["event_shape"] == [1, 28, 28] and record["checkpoint"] == "best"
    assert record["config"]["data"].get("data_dir") is None  # no path of this machine


def test_eval_of_the_folder_equals_eval_of_the_run(run_dir, exported, tmp_path, capsys):
    outs = []
    for source in (run_dir, exported):
        path = tmp_path / f"{source.name}.json"
        assert main(["eval", str(source), "--limit", "40", "--json", str(path),
                     "--set", "eval.estimator=is", "--iw-samples", "8"]) == 0
        outs.append(json.loads(path.read_text()))
    for key in ("nelbo", "nelbo_stderr", "nll", "nll_stderr"):
        assert outs[0][key] == outs[1][key], key
    assert main(["sample", str(exported), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    capsys.readouterr()


def test_model_card_carries_the_report_numbers(exported):
    card = (exported / "README.md").read_text()
    report = json.loads((exported / "report.json").read_text())
    meta = front_matter(card)
    assert meta["library_name"] == "vaelab" and meta["license"] == "mit"
    assert "vaelab" in meta["tags"] and meta["datasets"] == ["zalando-datasets/fashion_mnist"]
    metrics = {m["type"]: m for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["nelbo"]["value"] == report["nelbo"]
    assert metrics["nelbo"]["args"]["stderr"] == report["nelbo_stderr"]
    nll = metrics["nll"]
    assert nll["value"] == report["nll"] and nll["args"]["stderr"] == report["nll_stderr"]
    assert nll["args"]["estimator"] == report["estimator"]["name"] == "auto"
    assert nll["args"]["verdict"] == report["verdict"]["status"]
    assert nll["args"]["importance_samples"] == report["estimator"]["samples"] == 20
    assert nll["args"]["ais_checked_examples"] == report["estimator"]["correction"]["examples"]
    assert f"{report['nll']:.3f} ± {report['nll_stderr']:.3f}" in card
    assert report["verdict"]["text"] in card
    assert "vaelab train --config train-config.toml" in card
    # huggingface_hub reads the metrics back as eval results
    from huggingface_hub import ModelCard

    results = ModelCard(card).data.eval_results
    assert {r.metric_type: r.metric_value for r in results} == {
        "nelbo": report["nelbo"], "nll": report["nll"]}


def test_card_claims_no_nll_for_an_unnormalised_likelihood(exported):
    record = json.loads((exported / "config.json").read_text())
    report = json.loads((exported / "report.json").read_text())
    report.update(nll=None, nll_stderr=None, normalized=False, verdict={
        "status": "no nll", "text": "no NLL is claimed"})
    card = hub.model_card(record, report)
    metrics = front_matter(card)["model-index"][0]["results"][0]["metrics"]
    assert [m["type"] for m in metrics] == ["nelbo"]
    assert "No NLL is claimed" in card and "NOT normalised" in card


def test_the_reproduce_config_resolves_to_the_run_config(run_dir, exported):
    cfg = config.resolve(file=exported / "train-config.toml")
    saved = runs.open_run(run_dir).config
    assert config.to_dict(cfg)["model"] == config.to_dict(saved)["model"]
    assert config.to_dict(cfg)["train"] == config.to_dict(saved)["train"]


# ----------------------------------------------------------------------------- refusals


def _copy(exported: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    return folder


def _refused(folder: Path, pattern: str) -> None:
    with pytest.raises(CheckpointError, match=pattern) as err:
        hub.from_pretrained(folder)
    assert "\n" not in str(err.value)


def test_tampered_weights_are_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _refused(folder, "does not match its sha256|bytes but")


def test_code_and_pickles_are_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    (folder / "modeling_vae.py").write_text("import os\n")
    _refused(folder, r"modeling_vae\.py, Python code: vaelab never runs code")
    (folder / "modeling_vae.py").unlink()
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    _refused(folder, r"pytorch_model\.bin, a pickle")


def test_config_that_smuggles_code_is_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    record = json.loads((folder / "config.json").read_text())
    record["auto_map"] = {"AutoModel": "modeling_vae.VAE"}
    (folder / "config.json").write_text(json.dumps(record))
    _refused(folder, "has the key 'auto_map'.*no code to import")


def test_a_model_entry_naming_a_python_class_is_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    record = json.loads((folder / "config.json").read_text())
    record["config"]["model"]["kind"] = "evil_module:Backdoor"
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(VaelabError, match="evil_module:Backdoor") as err:
        hub.from_pretrained(folder)
    assert "\n" not in str(err.value)


def test_a_config_describing_another_model_is_refused_before_it_is_built(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    record = json.loads((folder / "config.json").read_text())
    record["config"]["model"]["latent_dim"] = 10**6  # would allocate gigabytes
    (folder / "config.json").write_text(json.dumps(record))
    _refused(folder, "describes another model than its weights")
    record["event_shape"] = ["28", 28]
    (folder / "config.json").write_text(json.dumps(record))
    _refused(folder, "not a list of positive sizes")


def test_mismatched_architecture_is_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    record = json.loads((folder / "config.json").read_text())
    record["config"]["model"]["latent_dim"] = 8  # the weights are for 4
    (folder / "config.json").write_text(json.dumps(record))
    _refused(folder, r"describes another model than its weights: .* is \(\d+, \d+\) in "
                     r"model.safetensors but \(\d+, \d+\) in the model of config.json")


def test_the_other_checkpoint_is_refused_with_the_fix(exported):
    with pytest.raises(CheckpointError, match="holds the 'best' checkpoint only.*--checkpoint "
                                              "best"):
        runs.open_run(exported, "last")


def test_export_needs_a_report_of_the_same_weights(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "report.json").unlink()
    with pytest.raises(CheckpointError, match="has no evaluation report.*vaelab eval"):
        hub.export_run(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    report = json.loads((run_dir / "report.json").read_text())
    assert report["weights_sha256"] == checkpoint.weights_fingerprint(
        runs.open_run(run_dir).model)
    for edit, pattern in ((lambda r: r.update(weights_sha256="0" * 64), "evaluates other "
                           "weights than the 'best' checkpoint"),
                          (lambda r: r.pop("weights_sha256"), "does not record which weights")):
        other = dict(report)
        edit(other)
        (copy / "other.json").write_text(json.dumps(other))
        with pytest.raises(CheckpointError, match=pattern) as err:
            hub.export_run(copy, tmp_path / "out", report=copy / "other.json")
        assert "--report" in str(err.value) and "\n" not in str(err.value)


def test_a_failed_export_leaves_the_earlier_one_intact(run_dir, exported, tmp_path,
                                                       monkeypatch):
    from vaelab import onnx_export

    folder = _copy(exported, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(model, out_dir, **kwargs):
        (Path(out_dir) / "decoder.onnx").write_bytes(b"half")
        raise VaelabError("decoder.onnx's output px_params differs from torch's by 1")

    monkeypatch.setattr(onnx_export, "require_onnx", lambda: None)
    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    with pytest.raises(VaelabError, match="differs from torch's"):
        hub.export_run(run_dir, folder, onnx=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no staging left


def test_another_librarys_model_folder_is_not_overwritten(run_dir, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    for name, text in (("config.json", '{"model_type": "bert"}'), ("README.md", "mine"),
                       ("model.safetensors", "weights")):
        (folder / name).write_text(text)
    with pytest.raises(VaelabError, match="not a vaelab export .*config.json that is not"):
        hub.export_run(run_dir, folder)
    assert (folder / "README.md").read_text() == "mine"
    with pytest.raises(CheckpointError, match="is not a vaelab model"):
        hub.from_pretrained(folder)


def test_paths_of_this_machine_are_not_shared(tmp_path):
    cfg = config.resolve(overrides=[f"data.dataset={tmp_path / 'secret_faces.npz'}"])
    shared = hub._shareable_config(cfg)
    assert shared.data.dataset == "secret_faces.npz" and shared.data.data_dir is None
    assert str(tmp_path) not in config.to_toml(shared)
    report = hub._shareable_report({"dataset": str(tmp_path / "secret_faces.npz")})
    assert report["dataset"] == "secret_faces.npz"
    assert config.resolve().data.dataset == hub._shareable_config(config.resolve()).data.dataset


def test_a_mistyped_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(CheckpointError, match="no such folder: runs/mnist-typo"):
        hub.from_pretrained("runs/mnist-typo")
    with pytest.raises(CheckpointError, match="no such folder"):
        hub.from_pretrained("./alice/vae")


def test_plot_and_sample_of_a_folder_write_beside_it(exported, tmp_path, monkeypatch,
                                                    capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", str(exported), "--n", "4"]) == 0
    assert (tmp_path / f"{exported.name}-figures" / "samples-best-seed0.png").is_file()
    assert not (exported / "figures").exists()
    capsys.readouterr()


def test_top_level_from_pretrained(exported):
    import vaelab

    model = vaelab.from_pretrained(exported)
    assert model.latent_dim == 4


def test_export_never_overwrites_other_files(run_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(VaelabError, match="not empty and is not a vaelab export"):
        hub.export_run(run_dir, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_errors_are_one_line(run_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vaelab: error: run directory") and "\n" not in err
    assert main(["push", str(run_dir), "not a repo id"]) == 2
    assert "not a Hub repository id" in capsys.readouterr().err


def test_without_huggingface_hub_export_works_and_push_says_how(run_dir, tmp_path,
                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert hub.export_run(run_dir, tmp_path / "out").is_dir()
    assert hub.from_pretrained(tmp_path / "out") is not None
    with pytest.raises(VaelabError, match=r"need huggingface_hub: pip install 'vaelab\[hub\]'"):
        hub.push(run_dir, "alice/vae")
    with pytest.raises(VaelabError, match="need huggingface_hub"):
        hub.from_pretrained("alice/vae")


# ----------------------------------------------------------------------------- the Hub


@pytest.fixture()
def hf_home(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub", reason="pip install 'vaelab[hub]'")
    import huggingface_hub.constants as constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return home


def test_push_then_download_through_a_fake_hub(run_dir, hf_home, tmp_path):
    from fake_hub import FakeHub

    with FakeHub() as fake:
        env = {**os.environ, "HF_ENDPOINT": fake.url, "HF_TOKEN": "hf_test",
               "HF_HOME": str(hf_home)}
        done = subprocess.run([sys.executable, "-m", "vaelab", "push", str(run_dir),
                               "alice/fashion-vae", "--private", "--license", "mit"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().startswith(f"{fake.url}/alice/fashion-vae/commit/")
        assert not fake.unknown
        repo = fake.repos["alice/fashion-vae"]
        assert repo["private"] and len(repo["commits"]) == 2  # created, then one commit
        assert fake.cards and front_matter(fake.cards[0])["library_name"] == "vaelab"
        model = hub.from_pretrained("alice/fashion-vae", endpoint=fake.url)
        original = runs.open_run(run_dir).model
        assert all(torch.equal(v, model.state_dict()[k])
                   for k, v in original.state_dict().items())
        with pytest.raises(CheckpointError, match="was not found on the Hub"):
            hub.from_pretrained("alice/nothing", endpoint=fake.url)
        # a repository with a pickle where the weights should be
        fake.add_commit("bob/pickled", {"config.json": json.dumps(
            {"format": "vaelab-model"}).encode(), "pytorch_model.bin": b"\x80\x04."})
        asked = len(fake.requests)
        with pytest.raises(CheckpointError, match=r"pytorch_model\.bin, a pickle.*nothing "
                                                  r"was downloaded"):
            hub.from_pretrained("bob/pickled", endpoint=fake.url)
        # refused from the repository's file list: no file of it was fetched
        assert not [p for _, p in fake.requests[asked:] if "/resolve/" in p]
        # a vaelab export beside other files: only the export's files are downloaded
        pushed = fake.repos["alice/fashion-vae"]["commits"][-1][1]
        extra = {name: pushed[name] for name in ("config.json", "model.safetensors")}
        fake.add_commit("carol/with-extras", {**extra, "big-dataset.npz": b"\0" * 1000})
        asked = len(fake.requests)
        hub.from_pretrained("carol/with-extras", endpoint=fake.url)
        fetched = {p.rsplit("/", 1)[-1] for _, p in fake.requests[asked:] if "/resolve/" in p}
        assert fetched == {"config.json", "model.safetensors"}

        # offline (HF_HUB_OFFLINE=1, a new process), the cache serves the same model with
        # the same checks, and the Hub hears nothing
        asked = len(fake.requests)
        script = ("import sys, torch, vaelab; m = vaelab.from_pretrained('alice/fashion-vae'); "
                  "torch.save(m.state_dict(), sys.argv[1])")
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sd.pt")],
                              env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        again = torch.load(tmp_path / "sd.pt", weights_only=True)
        assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
        assert len(fake.requests) == asked
        done = subprocess.run([sys.executable, "-m", "vaelab", "eval", "carol/never-seen"],
                              env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and "run directory carol/never-seen does not exist" in \
            done.stderr


def test_a_second_push_replaces_the_first_and_private_is_kept(run_dir, hf_home, tmp_path):
    from fake_hub import FakeHub

    with FakeHub() as fake:
        fake.add_commit("alice/public", {"README.md": b"old", "encoder.onnx": b"stale"})
        hub.push(run_dir, "alice/public", endpoint=fake.url, token="hf_test")
        files = fake.repos["alice/public"]["commits"][-1][1]
        assert "encoder.onnx" not in files  # deleted in the same commit
        assert sorted(files) == sorted(p.name for p in hub.export_run(
            run_dir, tmp_path / "e").iterdir())
        commits = len(fake.repos["alice/public"]["commits"])
        with pytest.raises(VaelabError, match="exists and is public.*nothing was uploaded"):
            hub.push(run_dir, "alice/public", private=True, endpoint=fake.url,
                     token="hf_test")
        assert len(fake.repos["alice/public"]["commits"]) == commits
    # the Hub is gone: one line, not a traceback
    with pytest.raises(VaelabError, match="pushing to alice/public failed .*check the network"):
        hub.push(run_dir, "alice/public", endpoint=fake.url, token="hf_test")


def test_weights_loader_checks_size_before_reading(tmp_path):
    model = torch.nn.Linear(3, 2)
    info = checkpoint.save_weights(tmp_path / "model.safetensors", model)
    other = torch.nn.Linear(3, 2)
    checkpoint.load_weights(tmp_path / "model.safetensors", other, sha256=info["sha256"],
                            size=info["bytes"])
    assert torch.equal(other.weight, model.weight)
    with pytest.raises(CheckpointError, match="bytes but"):
        checkpoint.load_weights(tmp_path / "model.safetensors", other,
                                sha256=info["sha256"], size=info["bytes"] + 1)
    with pytest.raises(CheckpointError, match="weight is .* in the checkpoint but"):
        checkpoint.load_weights(tmp_path / "model.safetensors", torch.nn.Linear(4, 2),
                                sha256=info["sha256"], size=info["bytes"])
