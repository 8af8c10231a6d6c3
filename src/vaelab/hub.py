"""Share trained models: export a run to a folder, load it back, push it to a Hugging Face Hub.

An exported folder is what a Hub repository (or a colleague) takes as it is::

    model.safetensors    the model's state dict, tensors only
    config.json          vaelab version, event shape, the resolved run config, the
                         weights' sha256 and size (format "vaelab-model")
    report.json          the run's evaluation of these weights (NELBO, NLL, verdict, ...)
    README.md            the model card: Hub front matter whose ``model-index`` metrics are
                         the report's, then the data, warnings, loading and reproducing
    metrics.jsonl        the per-epoch training curve (when the run has one)
    train-config.toml    the config that reproduces the run (``vaelab train --config``)
    encoder.onnx, decoder.onnx   with ``onnx=True`` (:mod:`vaelab.onnx_export`)

:func:`from_pretrained` loads a folder, a run directory or a Hub repository id through the
same strict checks as a checkpoint (:mod:`vaelab.runs`): recorded sha256 and size, exactly the
model's state-dict keys and shapes, nothing unpickled, no code. ``huggingface_hub`` is needed
only for repository ids and :func:`push` (``pip install 'vaelab[hub]'``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, runs
from . import checkpoint as ckpt
from . import config as config_mod
from ._io import atomic_write_text
from .data import DATASETS
from .errors import CheckpointError, VaelabError

__all__ = ["export_run", "model_card", "from_pretrained", "push", "HUB_EXTRA"]

#: What to install for Hub repositories (the tested major version of huggingface_hub).
HUB_EXTRA = "pip install 'vaelab[hub]'"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Hub dataset ids of the registered datasets (the card's ``datasets`` field).
_HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion-mnist": "zalando-datasets/fashion_mnist",
                 "cifar10": "uoft-cs/cifar10"}
_DATA_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
               "binarized-mnist": "binarized MNIST (Larochelle & Murray 2011)"}


# ----------------------------------------------------------------------------- export


def export_run(run_dir: str | Path, out_dir: str | Path, *, checkpoint: str = "best",
               report: str | Path | None = None, license: str = "other",
               onnx: bool = False) -> Path:
    """Write the exported folder of ``run_dir``'s ``checkpoint`` into ``out_dir``.

    Args:
        report: the evaluation of these weights to put in the card (default the run's
            ``report.json``, which ``vaelab train`` writes for the best checkpoint); it
            must be of the same checkpoint and epoch.
        license: the card's license (a Hub license id, e.g. ``mit``, ``cc-by-4.0``).
        onnx: also write ``encoder.onnx`` and ``decoder.onnx`` (``vaelab[onnx]``).

    Returns:
        ``out_dir``.

    Raises:
        CheckpointError: no such run/checkpoint, or no evaluation report of these weights;
        VaelabError: ``out_dir`` is a non-empty folder that is not an earlier export.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if runs.is_exported(run_dir):
        raise CheckpointError(f"{run_dir} is already an exported model: copy the folder, or "
                              "export the run directory it came from")
    if onnx:
        from . import onnx_export

        onnx_export.require_onnx()  # before anything is written
    run = runs.open_run(run_dir, checkpoint)
    if onnx:
        onnx_export.refuse_own_flow_weights(run.model)  # an iaf posterior: before writing
    result = _matching_report(run, Path(report) if report else run_dir / "report.json")
    _check_out_dir(out_dir)

    cfg = _shareable_config(run.config)
    result = _shareable_report(result)
    # Everything is written into a new sibling folder that replaces out_dir only once it is
    # complete: a failed export (an ONNX mismatch, a full disk) leaves out_dir as it was.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weights = ckpt.save_weights(staging / "model.safetensors", run.model)
        record = {
            "format": runs.EXPORT_FORMAT, "format_version": runs.EXPORT_FORMAT_VERSION,
            "vaelab_version": __version__, "torch_version": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_name": run_dir.resolve().name, "checkpoint": checkpoint, "epoch": run.epoch,
            "event_shape": list(run.model.event_shape), "latent_dim": run.model.latent_dim,
            "weights": weights, "config": config_mod.to_dict(cfg),
        }
        atomic_write_text(staging / "config.json", json.dumps(record, indent=2) + "\n")
        atomic_write_text(staging / "report.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(staging / "train-config.toml", config_mod.to_toml(cfg))
        if (run_dir / "metrics.jsonl").is_file():
            shutil.copyfile(run_dir / "metrics.jsonl", staging / "metrics.jsonl")
        if onnx:
            onnx_export.export_onnx(run.model, staging)
        atomic_write_text(staging / "README.md", model_card(record, result, license=license,
                                                            onnx=onnx))
        _replace(out_dir, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _matching_report(run: runs.Run, path: Path) -> dict[str, Any]:
    """The report at ``path``, checked to be an evaluation of exactly ``run``'s weights
    (its ``weights_sha256``, which every vaelab evaluation records)."""
    fix = (f"evaluate these weights with vaelab eval {run.directory} --checkpoint "
           f"{run.checkpoint} --json {run.directory / f'report-{run.checkpoint}.json'} and "
           "pass that file with --report")
    if not path.is_file():
        raise CheckpointError(f"{run.directory} has no evaluation report ({path} is missing): "
                              f"a model is shared with its numbers; {fix}")
    try:
        result = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable report ({err}): {fix}") from None
    if not isinstance(result, dict) or "nelbo" not in result:
        raise CheckpointError(f"{path} is not a vaelab evaluation report: {fix}")
    recorded = result.get("weights_sha256")
    if recorded is None:
        raise CheckpointError(f"{path} does not record which weights it evaluated (written by "
                              f"an older vaelab): {fix}")
    if recorded != ckpt.weights_fingerprint(run.model):
        raise CheckpointError(
            f"{path} evaluates other weights than the {run.checkpoint!r} checkpoint of "
            f"{run.directory} (epoch {run.epoch}): {fix}")
    return result


def _check_out_dir(out_dir: Path) -> None:
    """``out_dir`` may be new, empty or an earlier export (replaced as a whole); anything
    else is refused, so nothing of the user's is ever overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise VaelabError(f"{out_dir} is a file: give a folder to export into")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        foreign = [p.name for p in out_dir.iterdir() if p.name not in runs.EXPORT_FILES]
        if foreign or not runs.is_exported(out_dir):
            what = foreign[0] if foreign else "a config.json that is not a vaelab model's"
            raise VaelabError(f"{out_dir} is not empty and is not a vaelab export (it holds "
                              f"{what}): give a new folder")


def _replace(out_dir: Path, staging: Path) -> None:
    """Put the complete ``staging`` folder in place of ``out_dir`` (checked by
    :func:`_check_out_dir`): the old folder is moved aside, then removed."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        out_dir.rename(old / "export")
    try:
        staging.rename(out_dir)
    except OSError:
        if old is not None:  # put the earlier export back
            (old / "export").rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _is_own_data(name: str | None) -> bool:
    return bool(name) and name not in DATASETS


def _shareable_config(cfg: config_mod.RunConfig) -> config_mod.RunConfig:
    """The run's config without this machine's paths: no data directory, and a file or
    folder of your own named by its base name only."""
    data = dataclasses.replace(cfg.data, data_dir=None)
    for key in ("dataset", "test_dataset"):
        value = getattr(data, key, None)
        if _is_own_data(value):
            data = dataclasses.replace(data, **{key: Path(value).name})
    return dataclasses.replace(cfg, data=data)


def _shareable_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report with a dataset path reduced to its base name (as in the config)."""
    report = dict(report)
    if _is_own_data(report.get("dataset")):
        report["dataset"] = Path(report["dataset"]).name
    return report


# ----------------------------------------------------------------------------- the card


def model_card(record: dict[str, Any], report: dict[str, Any], *, license: str = "other",
               onnx: bool = False) -> str:
    """The ``README.md`` of an exported folder: Hub front matter (``library_name: vaelab``,
    license, tags, ``model-index`` with the report's metrics) and a body that says what the
    model is, its numbers with their uncertainty and verdict, its warnings, how to load it
    and how to reproduce it. No NLL is listed where the likelihood is not normalised."""
    cfg = record["config"]
    data, model, lik = cfg["data"], cfg["model"], cfg["likelihood"]
    dataset = data["dataset"]
    name = record.get("run_name") or "vaelab-model"
    data_name = _DATA_NAMES.get(dataset, dataset)
    metrics = _card_metrics(report)
    front = ["---", "library_name: vaelab", f"license: {_yaml(license)}", "tags:"]
    tags = ["vaelab", "variational-autoencoder", "vae", "pytorch", "safetensors"]
    tags += [dataset] if dataset in DATASETS else ["own-data"]
    front += [f"- {_yaml(t)}" for t in tags]
    if dataset in _HUB_DATASETS:
        front += ["datasets:", f"- {_HUB_DATASETS[dataset]}"]
    front += ["model-index:", f"- name: {_yaml(name)}", "  results:", "  - task:",
              "      type: density-estimation", "      name: Density estimation",
              "    dataset:", f"      type: {_yaml(dataset)}", f"      name: {_yaml(data_name)}",
              f"      split: {_yaml(report.get('split', 'test'))}", "    metrics:"]
    for metric in metrics:
        front += [f"    - type: {metric['type']}", f"      name: {_yaml(metric['name'])}",
                  f"      value: {metric['value']!r}", "      args:"]
        front += [f"        {k}: {_yaml(v)}" for k, v in metric["args"].items()]
    front.append("---")

    verdict = (report.get("verdict") or {}).get("text")
    trained_by = (runs.framework_text(report["trained_with"])
                  if report.get("trained_with") else None)
    body = [
        f"# {name}", "",
        (f"A variational autoencoder trained with {trained_by} and evaluated with "
         f"[vaelab](https://pypi.org/project/vaelab/) {record.get('vaelab_version', '')}"
         if trained_by else
         f"A variational autoencoder trained with [vaelab](https://pypi.org/project/vaelab/) "
         f"{record.get('vaelab_version', '')}")
        + f" on {data_name}; binarisation: {report.get('binarization') or data.get('binarize')}.",
        "",
        "| | |", "|---|---|",
        f"| model | {model['kind']}, latent dimension {model['latent_dim']}, "
        f"prior {cfg['prior']['name']}, posterior flow {cfg['posterior']['flow']} |",
        f"| likelihood | {lik['name']} ({_normalised(report)}) |",
        f"| weights | {record['checkpoint']} checkpoint, epoch {record.get('epoch')}, "
        f"`model.safetensors` sha256 `{record['weights']['sha256']}` |",
        f"| trained with | {trained_by} |" if trained_by else
        f"| preset | {report.get('preset') or cfg.get('preset') or 'default'} |",
        "",
        f"## Results on the {report.get('split', 'test')} split "
        f"({report.get('n_examples')} examples, nats per example)", "",
        "| metric | value | how |", "|---|---|---|",
    ]
    for metric in metrics:
        args = metric["args"]
        how = ("the ELBO with beta = 1, summed over the data dimensions" if metric["type"]
               == "nelbo" else f"{args.get('estimator')}: {args.get('estimator_detail')}; "
               f"verdict {args.get('verdict', 'n/a')}")
        body.append(f"| {metric['name']} | {metric['value']:.3f} ± "
                    f"{metric['args']['stderr']:.3f} | {how} |")
    if report.get("nll") is None:
        body += ["", "No NLL is claimed: the likelihood is not normalised for this data."]
    if verdict:
        body += ["", f"Verdict on the NLL: {verdict}"]
    warnings = report.get("warnings") or []
    if warnings:
        body += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    onnx_line = (["", "`encoder.onnx` maps images (B, C, H, W) in [0, 1] to q(z|x)'s `qz_loc` "
                  "and `qz_scale`; `decoder.onnx` maps z (N, L) to the likelihood's parameters "
                  "and its mean image."] if onnx else [])
    body += [
        "", "## Use it", "",
        "```python", "import vaelab.hub", "",
        'model = vaelab.hub.from_pretrained("THIS_FOLDER_OR_REPO_ID")  # strict: sha256, keys,'
        " shapes", "px = model.decode(model.prior().sample((16,)))  # p(x|z) of 16 prior draws",
        "```", "",
        "```sh",
        "vaelab eval THIS_FOLDER --data-dir WHERE_THE_DATA_IS   # the numbers above, again",
        "vaelab sample THIS_FOLDER --n 64 --out samples.png", "```", *onnx_line,
        "", "## Reproduce it", "",
        "```sh", f"vaelab train --config train-config.toml --out runs/{name}", "```", "",
        "`train-config.toml` is the run's resolved config; `metrics.jsonl` its per-epoch "
        "curve. Set `--data-dir` if the data is not where vaelab looks by default.",
    ]
    return "\n".join(front + [""] + body) + "\n"


def _card_metrics(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``model-index`` metrics: NELBO, and the NLL with its estimator and verdict."""
    base = {"n_examples": report.get("n_examples"), "units": "nats per example"}
    out = [{"type": "nelbo", "name": "negative ELBO", "value": float(report["nelbo"]),
            "args": {"stderr": float(report["nelbo_stderr"]), **base}}]
    if report.get("nll") is not None:
        est = report.get("estimator") or {}
        args = {"stderr": float(report["nll_stderr"]), **base,
                "estimator": est.get("name"), "estimator_detail": est.get("description"),
                "importance_samples": report.get("iw_samples") or est.get("samples"),
                "ais_checked_examples": (est.get("correction") or {}).get("examples"),
                "verdict": (report.get("verdict") or {}).get("status")}
        k_hat = report.get("pareto_k") or {}
        if k_hat.get("max") is not None:
            args["pareto_k_max"] = round(float(k_hat["max"]), 3)
            args["pareto_k_fraction_above"] = k_hat.get("fraction_above")
        out.append({"type": "nll", "name": "negative log-likelihood", "value":
                    float(report["nll"]), "args": {k: v for k, v in args.items()
                                                   if v is not None}})
    return out


def _normalised(report: dict[str, Any]) -> str:
    return ("normalised for this data" if report.get("normalized", True)
            else "NOT normalised for this data: no NLL")


def _yaml(value: Any) -> str:
    """A YAML scalar: JSON's quoting for strings (valid YAML), numbers and null as they are."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


# ----------------------------------------------------------------------------- load


def from_pretrained(path_or_repo_id: str | Path, revision: str | None = None, *,
                    checkpoint: str | None = None, device: str | torch.device = "cpu",
                    endpoint: str | None = None) -> nn.Module:
    """A trained model, in eval mode, ready for :func:`vaelab.evaluate.evaluate`, the figures
    and sampling.

    Args:
        path_or_repo_id: an exported folder, a run directory, or a Hub repository id
            (``owner/name``, downloaded with ``huggingface_hub.snapshot_download``, which
            honours ``HF_HUB_OFFLINE=1`` and its cache).
        revision: the repository's branch, tag or commit (Hub ids only).
        checkpoint: ``best`` or ``last`` (default: the one the folder holds; ``best`` for a
            run directory).
        endpoint: another Hub server (a mirror); default ``HF_ENDPOINT`` or huggingface.co.

    Raises:
        CheckpointError: the folder or repository is not a vaelab model, or fails a check.
        VaelabError: a repository id without ``huggingface_hub`` installed.
    """
    folder = Path(path_or_repo_id)
    if not folder.exists():
        text = str(path_or_repo_id)
        owner = text.split("/", 1)[0]
        if not _REPO_ID.match(text) or text[0] in "./~" or Path(owner).exists():
            # runs/mnist-typo is a mistyped folder here, not a stranger's repository
            raise CheckpointError(f"no such folder: {path_or_repo_id} (a Hub repository id "
                                  "is owner/name, and no folder named like its owner exists "
                                  "here): check the path")
        folder = _download(text, revision, endpoint)
    elif revision is not None:
        raise VaelabError(f"revision={revision!r} applies to Hub repositories only, and "
                          f"{folder} is a local folder: drop it")
    if checkpoint is None:
        checkpoint = (runs.read_export_record(folder)["checkpoint"]
                      if runs.is_exported(folder) else "best")
    if not runs.is_exported(folder) and not (folder / "checkpoints").is_dir():
        raise CheckpointError(_not_a_model(folder))
    return runs.open_run(folder, checkpoint, device).model


def _not_a_model(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())[:6] if folder.is_dir() else []
    return (f"{folder} is not a vaelab model: no config.json + model.safetensors (it holds "
            f"{', '.join(names) or 'nothing'}); models are shared with vaelab export")


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise VaelabError(f"Hugging Face Hub repositories need huggingface_hub: {HUB_EXTRA}"
                          ) from None
    return huggingface_hub


#: The files an exported folder holds: the only ones downloaded from a Hub repository.
EXPORT_FILES = ("config.json", "model.safetensors", "report.json", "README.md",
                "metrics.jsonl", "train-config.toml", "encoder.onnx", "decoder.onnx")


def _download(repo_id: str, revision: str | None, endpoint: str | None) -> Path:
    """The repository's vaelab files (:data:`EXPORT_FILES`) in the local Hub cache,
    downloaded unless cached. Online, the repository's file list is read first: one with
    code or pickles is refused before anything is downloaded."""
    hf = _hub()
    try:
        if not hf.is_offline_mode():
            for name in hf.HfApi(endpoint=endpoint).list_repo_files(repo_id,
                                                                    revision=revision):
                kind = runs.refused_file(name)
                if kind:
                    raise CheckpointError(
                        f"{repo_id} holds {name}, {kind}: vaelab never runs code or "
                        "unpickles files from a model repository (nothing was downloaded); "
                        "share models with vaelab push (safetensors + JSON)")
        folder = hf.snapshot_download(repo_id, revision=revision, endpoint=endpoint,
                                      allow_patterns=list(EXPORT_FILES))
    except CheckpointError:
        raise
    except hf.errors.LocalEntryNotFoundError:
        raise CheckpointError(f"{repo_id} is not in the local Hub cache and the Hub cannot be "
                              "reached (HF_HUB_OFFLINE=1?): download it once online") from None
    except (hf.errors.RepositoryNotFoundError, hf.errors.RevisionNotFoundError) as err:
        raise CheckpointError(f"{repo_id}{'@' + revision if revision else ''} was not found "
                              f"on the Hub ({type(err).__name__}): check the id, the "
                              "revision and your token (hf auth login)") from None
    except Exception as err:  # HTTP errors and the HTTP client's connection errors
        raise CheckpointError(f"downloading {repo_id} failed ({_first_line(err)}): check the "
                              "network, HF_ENDPOINT and your token") from None
    folder = Path(folder)
    if not runs.is_exported(folder):
        raise CheckpointError(_not_a_model(folder).replace(str(folder), repo_id, 1))
    return folder


# ----------------------------------------------------------------------------- push


def push(run_dir: str | Path, repo_id: str, *, private: bool = False, checkpoint: str = "best",
         report: str | Path | None = None, token: str | None = None, license: str = "other",
         onnx: bool = False, endpoint: str | None = None) -> str:
    """Export ``run_dir`` (:func:`export_run`) and upload the folder to the Hub repository
    ``repo_id`` in one commit, creating the repository (``private`` if asked) when it does
    not exist. The commit also deletes the repository's other files (an earlier push's ONNX
    graphs, say), so the repository holds exactly the export. ``private`` with an existing
    public repository is refused (nothing is uploaded).

    Returns:
        the URL of the commit.

    Raises:
        VaelabError: a bad repository id, no ``huggingface_hub``, or a refused upload.
        CheckpointError: the run cannot be exported (e.g. it has no report).
    """
    if not _REPO_ID.match(repo_id):
        raise VaelabError(f"{repo_id!r} is not a Hub repository id: write it as owner/name, "
                          "e.g. alice/fashion-vae")
    hf = _hub()
    with tempfile.TemporaryDirectory(prefix="vaelab-export-") as tmp:
        folder = export_run(run_dir, Path(tmp) / "model", checkpoint=checkpoint,
                            report=report, license=license, onnx=onnx)
        api = hf.HfApi(endpoint=endpoint, token=token)
        try:
            api.create_repo(repo_id, private=True if private else None, exist_ok=True,
                            repo_type="model")
            if private and not api.repo_info(repo_id, repo_type="model").private:
                raise VaelabError(f"{repo_id} exists and is public, and --private was asked: "
                                  "nothing was uploaded; make it private on the Hub first, or "
                                  "push without --private")
            info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                                     delete_patterns="*",
                                     commit_message=f"vaelab export of {Path(run_dir).name} "
                                                    f"({checkpoint} checkpoint)")
        except VaelabError:
            raise
        except Exception as err:  # HTTP errors and the HTTP client's connection errors
            raise VaelabError(f"pushing to {repo_id} failed ({_first_line(err)}): check the "
                              "network, HF_ENDPOINT and your token (hf auth login)") from None
    return str(getattr(info, "commit_url", info))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
