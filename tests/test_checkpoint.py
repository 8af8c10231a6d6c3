"""vaelab.checkpoint: exact round trips, crash safety, damaged and hostile files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vaelab
from vaelab import checkpoint as ckpt
from vaelab.checkpoint import (
    atomic_write_bytes,
    atomic_write_text,
    config_diff,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from vaelab.errors import CheckpointError


def make_model(hidden=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.Tanh(),
                         nn.Linear(hidden, 3))


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def make_adam(model):
    # two parameter groups, to check the group mapping
    params = list(model.parameters())
    return torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}],
                            lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-4)


DATA_X = torch.linspace(-2, 2, 64).reshape(16, 4)
DATA_Y = torch.sin(torch.linspace(0, 6, 48)).reshape(16, 3)


def train_steps(model, optimizer, n, scheduler=None):
    model.train()
    for _ in range(n):
        optimizer.zero_grad()
        loss = ((model(DATA_X) - DATA_Y) ** 2).mean()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def ckpt_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------- round trips


def test_round_trip_is_bitwise_and_meta_is_complete(tmp_path):
    model = make_model()
    train_steps(model, make_adam(model), 2)
    meta = {"config": {"model": {"hidden": [8]}}, "step": 1234, "epoch": 2,
            "values": [0.1, 1e-300, -0.0, 2**60], "best": None}
    save_checkpoint(tmp_path / "last", model=model, meta=meta)

    other = make_model(seed=1)
    assert not state_equal(model, other)
    loaded = load_checkpoint(tmp_path / "last", model=other)
    assert state_equal(model, other)  # includes BatchNorm's running stats and int64 counter
    for key in meta:
        assert loaded[key] == meta[key]
    assert loaded["format"] == "vaelab-checkpoint" and loaded["format_version"] == 1
    assert loaded["vaelab_version"] == vaelab.__version__
    assert loaded["torch_version"] == torch.__version__
    created = datetime.fromisoformat(loaded["created"])
    assert created.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 600
    assert re.fullmatch(r"last-00001234-[0-9a-f]{16}\.safetensors", loaded["tensor_file"])
    data = (tmp_path / loaded["tensor_file"]).read_bytes()
    assert loaded["tensor_bytes"] == len(data)
    assert loaded["tensor_sha256"] == hashlib.sha256(data).hexdigest()
    assert loaded["tensor_file"].startswith("last-00001234-" + loaded["tensor_sha256"][:16])
    assert read_meta(tmp_path / "last") == loaded
    assert read_meta(tmp_path / "last.json") == loaded
    assert ckpt_files(tmp_path) == sorted(["last.json", loaded["tensor_file"]])
    keys = set(load_file(tmp_path / loaded["tensor_file"]))
    assert {"model.0.weight", "model.1.num_batches_tracked", "rng.torch"} <= keys


def test_adam_and_scheduler_resume_exactly(tmp_path):
    model = make_model()
    opt = make_adam(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_steps(model, opt, 3, sched)
    save_checkpoint(tmp_path / "last", model=model, optimizer=opt,
                    meta={"scheduler": sched.state_dict(), "step": 3})
    train_steps(model, opt, 3, sched)  # the uninterrupted run

    resumed = make_model(seed=7)
    opt2 = make_adam(resumed)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    meta = load_checkpoint(tmp_path / "last", model=resumed, optimizer=opt2)
    sched2.load_state_dict(meta["scheduler"])
    step_tensor = opt2.state_dict()["state"][0]["step"]
    assert isinstance(step_tensor, torch.Tensor) and step_tensor.item() == 3.0
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)  # tuples stay tuples
    train_steps(resumed, opt2, 3, sched2)

    assert state_equal(model, resumed)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for idx in s1["state"]:
        for key, value in s1["state"][idx].items():
            assert torch.equal(value, s2["state"][idx][key]), (idx, key)
    assert opt2.param_groups[1]["lr"] == opt.param_groups[1]["lr"] == 3e-3 * 0.5**3


def test_generators_and_global_rng(tmp_path):
    gen = torch.Generator().manual_seed(11)
    torch.randn(5, generator=gen)
    torch.manual_seed(123)
    torch.rand(3)
    save_checkpoint(tmp_path / "c", model=make_model(), generators={"data": gen}, meta={})
    want_gen = torch.randn(5, generator=gen)
    want_global = torch.rand(4)

    gen2 = torch.Generator().manual_seed(999)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    load_checkpoint(tmp_path / "c", generators={"data": gen2})
    assert torch.equal(torch.randn(5, generator=gen2), want_gen)
    assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched by default
    load_checkpoint(tmp_path / "c", restore_global_rng=True)
    assert torch.equal(torch.rand(4), want_global)
    with pytest.raises(CheckpointError, match="no random state 'rng.gen.other'"):
        load_checkpoint(tmp_path / "c", generators={"other": torch.Generator()})


def test_tied_and_non_contiguous_tensors_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight  # shared storage
            self.register_buffer("t", torch.arange(12.0).reshape(3, 4).t())  # non-contiguous

    model = Tied()
    save_checkpoint(tmp_path / "m", model=model, meta={})
    other = Tied()
    with torch.no_grad():
        other.a.weight.zero_()
        other.t.zero_()
    load_checkpoint(tmp_path / "m", model=other)
    assert state_equal(model, other)
    assert other.a.weight is other.b.weight


def test_vae_with_learned_likelihood_scale_round_trips(tmp_path):
    from vaelab.models import build_model

    class Family(nn.Module):
        params_per_channel, data_kind = 2, "unit"

        def __init__(self):
            super().__init__()
            self.log_scale = nn.Parameter(torch.tensor(-0.3))

    model = build_model("conv", (1, 28, 28), 3, Family(), hidden=(8,), channels=(4, 8))
    save_checkpoint(tmp_path / "last", model=model, meta={})
    other = build_model("conv", (1, 28, 28), 3, Family(), hidden=(8,), channels=(4, 8))
    with torch.no_grad():
        other.likelihood.log_scale.fill_(5.0)
    load_checkpoint(tmp_path / "last", model=other)
    assert other.likelihood.log_scale.item() == pytest.approx(-0.3)
    assert state_equal(model, other)


# ----------------------------------------------------------------------------- crash safety


def _save_two(tmp_path, fail_replace_call=None, monkeypatch=None):
    """Save checkpoint v1, then try v2 with os.replace failing on call ``fail_replace_call``."""
    m1 = make_model(seed=1)
    save_checkpoint(tmp_path / "last", model=m1, meta={"version": 1})
    m2 = make_model(seed=2)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_replace_call:
            raise OSError(errno.EIO, "simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match="previous checkpoint is unchanged"):
        save_checkpoint(tmp_path / "last", model=m2, meta={"version": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    return m1, m2, calls


@pytest.mark.parametrize("fail_on", [1, 2])  # 1: tensor file rename, 2: JSON rename
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_on):
    m1, m2, calls = _save_two(tmp_path, fail_on, monkeypatch)
    failed = Path(calls[-1]).name
    assert failed == "last.json" if fail_on == 2 else failed.endswith(".safetensors")
    target = make_model(seed=3)
    assert load_checkpoint(tmp_path / "last", model=target)["version"] == 1
    assert state_equal(target, m1)
    assert not [f for f in ckpt_files(tmp_path) if f.endswith(".tmp")]
    # the next successful save leaves exactly one JSON and one tensor file
    save_checkpoint(tmp_path / "last", model=m2, meta={"version": 3})
    tensor_file = read_meta(tmp_path / "last")["tensor_file"]
    assert ckpt_files(tmp_path) == sorted(["last.json", tensor_file])
    load_checkpoint(tmp_path / "last", model=target)
    assert state_equal(target, m2)


def test_crash_after_commit_before_cleanup(tmp_path, monkeypatch):
    m1 = make_model(seed=1)
    save_checkpoint(tmp_path / "last", model=m1, meta={"version": 1})
    old_file = read_meta(tmp_path / "last")["tensor_file"]
    monkeypatch.setattr(os, "unlink", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    m2 = make_model(seed=2)
    save_checkpoint(tmp_path / "last", model=m2, meta={"version": 2})  # cleanup is best effort
    monkeypatch.undo()
    assert old_file in ckpt_files(tmp_path)
    target = make_model(seed=3)
    assert load_checkpoint(tmp_path / "last", model=target)["version"] == 2
    assert state_equal(target, m2)
    save_checkpoint(tmp_path / "last", model=m2, meta={"version": 3})
    assert old_file not in ckpt_files(tmp_path)


def test_first_save_crash_leaves_no_checkpoint(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.EIO, "simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "last", model=make_model(), meta={})
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="no checkpoint .*last.json does not exist"):
        load_checkpoint(tmp_path / "last", model=make_model())


def test_disk_full_during_write_is_a_clear_error(tmp_path, monkeypatch):
    m1 = make_model(seed=1)
    save_checkpoint(tmp_path / "last", model=m1, meta={"version": 1})

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path / "last", model=make_model(seed=2), meta={"version": 2})
    monkeypatch.undo()
    assert "No space left on device" in str(err.value)
    assert "free disk space" in str(err.value)
    target = make_model(seed=3)
    assert load_checkpoint(tmp_path / "last", model=target)["version"] == 1
    assert state_equal(target, m1)


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from vaelab.checkpoint import save_checkpoint
    model = nn.Linear(64, 64)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(step)
            model.bias.fill_(step)
        save_checkpoint(sys.argv[1], model=model, meta={"step": step})
        if step == 1:
            print("ready", flush=True)
    """
)


def test_kill_9_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "ckpt" / "last"
    steps = []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.kill()
            proc.wait(timeout=30)
        model = nn.Linear(64, 64)
        step = load_checkpoint(path, model=model)["step"]
        assert torch.equal(model.weight, torch.full((64, 64), float(step)))
        assert torch.equal(model.bias, torch.full((64,), float(step)))
        steps.append(step)
    assert all(s >= 1 for s in steps)
    names = ckpt_files(path.parent)
    assert "last.json" in names and len(names) <= 4  # old files of killed saves are cleaned


# ----------------------------------------------------------------------------- damaged files


@pytest.fixture
def saved(tmp_path):
    model = make_model(seed=1)
    save_checkpoint(tmp_path / "last", model=model, meta={"step": 7})
    meta = read_meta(tmp_path / "last")
    return tmp_path, model, tmp_path / meta["tensor_file"]


def _edit_json(directory: Path, **changes):
    path = directory / "last.json"
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


def _assert_refused(directory, pattern):
    target = make_model(seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_checkpoint(directory / "last", model=target)
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # no half-load
    return str(err.value)


def test_truncated_tensor_file(saved):
    directory, _, tensor_file = saved
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[: len(data) // 2])
    msg = _assert_refused(directory, "truncated")
    assert tensor_file.name in msg and f"{len(data) // 2} bytes" in msg
    assert "use another checkpoint" in msg


def test_tampered_tensor_file_same_size(saved):
    directory, _, tensor_file = saved
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    assert tensor_file.name in _assert_refused(directory, "does not match its sha256")


def test_json_references_missing_tensor_file(saved):
    directory, _, tensor_file = saved
    _edit_json(directory, tensor_file="last-00000007-0000000000000000.safetensors")
    _assert_refused(directory, "tensor file .*last-00000007-0000000000000000.safetensors is missing")
    tensor_file.unlink()
    _edit_json(directory, tensor_file=tensor_file.name)
    _assert_refused(directory, "is missing: the checkpoint is incomplete")


def test_tensor_key_missing_from_file(saved):
    directory, _, tensor_file = saved
    tensors = load_file(tensor_file)
    del tensors["model.3.bias"]
    save_file(tensors, tensor_file)
    data = tensor_file.read_bytes()
    _edit_json(directory, tensor_sha256=hashlib.sha256(data).hexdigest(), tensor_bytes=len(data))
    _assert_refused(directory, r"tensor 'model.3.bias' listed in the checkpoint is not in")


def test_json_lists_a_tensor_the_file_lacks(saved):
    directory, _, _ = saved
    record = json.loads((directory / "last.json").read_text())
    _edit_json(directory, tensors=[*record["tensors"], "model.extra"])
    _assert_refused(directory, r"tensor 'model.extra' listed in the checkpoint is not in .*"
                               r"\(1 missing\)")


@pytest.mark.parametrize("name", ["../x.safetensors", "sub/x.safetensors", "/tmp/x.safetensors",
                                  "..", ".hidden.safetensors", "x.pt", "a\\..\\x.safetensors"])
def test_tensor_file_path_escape_is_refused(saved, name):
    directory, _, tensor_file = saved
    # put a valid copy where the escape points, so only the name check can refuse it
    if name == "../x.safetensors":
        (directory.parent / "x.safetensors").write_bytes(tensor_file.read_bytes())
    _edit_json(directory, tensor_file=name)
    _assert_refused(directory, "not a plain .safetensors file name in the same directory")


def test_symlinked_tensor_file_is_refused(saved, tmp_path_factory):
    directory, _, tensor_file = saved
    outside = tmp_path_factory.mktemp("outside") / "real.safetensors"
    outside.write_bytes(tensor_file.read_bytes())
    tensor_file.unlink()
    tensor_file.symlink_to(outside)
    _assert_refused(directory, "symlinks are refused")


@pytest.mark.parametrize(
    "content",
    [b"hello, this is text\n", b"", json.dumps({"a": 1}).encode(), b"[1, 2]",
     json.dumps({"format": "other"}).encode(), pickle.dumps({"model": 1}), b"\xff\xfe\x00"],
    ids=["text", "empty", "json-dict", "json-list", "other-format", "pickle", "binary"],
)
def test_not_a_vaelab_checkpoint(tmp_path, content):
    (tmp_path / "last.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"last.json is not a vaelab checkpoint"):
        load_checkpoint(tmp_path / "last", model=make_model())
    with pytest.raises(CheckpointError, match="not a vaelab checkpoint"):
        read_meta(tmp_path / "last")


def test_newer_format_version_and_damaged_fields(saved):
    directory, _, _ = saved
    _edit_json(directory, format_version=2)
    _assert_refused(directory, "written by a newer vaelab: upgrade vaelab")
    _edit_json(directory, format_version=1, tensor_sha256="abc")
    _assert_refused(directory, "damaged: field 'tensor_sha256'")


def test_missing_checkpoint_lists_the_ones_there(saved):
    directory, _, _ = saved
    with pytest.raises(CheckpointError, match="no checkpoint .*best.*checkpoints there: last"):
        load_checkpoint(directory / "best", model=make_model())


class _Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_never_unpickled(saved, tmp_path_factory, monkeypatch):
    directory, model, tensor_file = saved
    probe = tmp_path_factory.mktemp("probe") / "ran"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()  # the payload is live: unpickling it runs code

    marker = tmp_path_factory.mktemp("marker") / "pwned"
    payload = pickle.dumps(_Payload(marker))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))

    tensor_file.write_bytes(payload)  # 1. disguised as the tensor file
    _assert_refused(directory, "truncated or was replaced")
    _edit_json(directory, tensor_sha256=hashlib.sha256(payload).hexdigest(),
               tensor_bytes=len(payload))  # 2. ... with a JSON that vouches for it
    _assert_refused(directory, "not a readable safetensors file")
    (directory / "last.json").write_bytes(payload)  # 3. disguised as the JSON
    _assert_refused(directory, "not a vaelab checkpoint")
    with pytest.raises(CheckpointError):
        read_meta(directory / "last")
    assert not marker.exists()


# ----------------------------------------------------------------------------- mismatches


def test_mismatched_model_names_key_shapes_and_config(tmp_path):
    model = make_model(hidden=8)
    save_checkpoint(tmp_path / "last", model=model,
                    meta={"config": {"model": {"hidden": [8], "kind": "mlp"}, "seed": 0}})
    other = make_model(hidden=16)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "last", model=other,
                        expect_config={"model": {"hidden": (16,), "kind": "mlp"}, "seed": 0})
    msg = str(err.value)
    assert "0.weight is (8, 4) in the checkpoint but (16, 4) in the model" in msg
    assert "written by a different model config" in msg
    assert "model.hidden: [8] in the checkpoint, [16] now" in msg
    assert "kind" not in msg and "seed" not in msg  # only differing entries
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_mismatched_vae_hidden_size(tmp_path):
    from vaelab.models import build_model

    class Family(nn.Module):
        params_per_channel, data_kind = 1, "binary"

    save_checkpoint(tmp_path / "last",
                    model=build_model("mlp", (1, 28, 28), 4, Family(), hidden=(32,)), meta={})
    with pytest.raises(CheckpointError, match=r"encoder.1.weight is \(32, 784\) in the "
                                              r"checkpoint but \(16, 784\) in the model"):
        load_checkpoint(tmp_path / "last",
                        model=build_model("mlp", (1, 28, 28), 4, Family(), hidden=(16,)))


def test_missing_and_unexpected_keys(tmp_path):
    save_checkpoint(tmp_path / "a", model=nn.Sequential(nn.Linear(2, 2)), meta={})
    with pytest.raises(CheckpointError, match="1.weight is missing from the checkpoint"):
        load_checkpoint(tmp_path / "a", model=nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    save_checkpoint(tmp_path / "b", model=nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
                    meta={})
    with pytest.raises(CheckpointError, match="1.bias is in the checkpoint but not in the model"):
        load_checkpoint(tmp_path / "b", model=nn.Sequential(nn.Linear(2, 2)))


def test_optimizer_mismatches_change_nothing(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path / "noopt", model=model, meta={})
    opt = make_adam(model)
    train_steps(model, opt, 1)
    save_checkpoint(tmp_path / "adam", model=model, optimizer=opt, meta={})

    target = make_model(seed=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    cases = [
        ("noopt", make_adam(target), "has no optimizer state"),
        ("adam", torch.optim.SGD(target.parameters(), lr=0.1), "holds Adam state, the optimizer "
                                                               "is SGD"),
        ("adam", torch.optim.Adam(target.parameters()), r"groups of sizes \[2, 4\], the "
                                                        r"optimizer has \[6\]"),
    ]
    for name, optimizer, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern):
            load_checkpoint(tmp_path / name, model=target, optimizer=optimizer)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_bad_meta_writes_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "last", model=make_model(), meta={"s": {1, 2}})
    with pytest.raises(CheckpointError, match="'format' is reserved"):
        save_checkpoint(tmp_path / "last", model=make_model(), meta={"format": "x"})
    assert ckpt_files(tmp_path) == []


def test_config_diff():
    saved = {"model": {"hidden": [400], "kind": "mlp"}, "train": {"lr": 0.001}}
    now = {"model": {"hidden": (400,), "kind": "conv"}, "train": {"lr": 0.001, "clip": 1.0}}
    assert config_diff(saved, now) == [
        'model.kind: "mlp" in the checkpoint, "conv" now',
        "train.clip: absent in the checkpoint, 1.0 now",
    ]


def test_other_checkpoints_in_the_directory_are_kept(tmp_path):
    save_checkpoint(tmp_path / "best", model=make_model(seed=1), meta={"step": 1})
    save_checkpoint(tmp_path / "last", model=make_model(seed=2), meta={"step": 2})
    save_checkpoint(tmp_path / "last", model=make_model(seed=3), meta={"step": 3})
    best, last = read_meta(tmp_path / "best"), read_meta(tmp_path / "last")
    assert ckpt_files(tmp_path) == sorted(
        ["best.json", "last.json", best["tensor_file"], last["tensor_file"]]
    )
    load_checkpoint(tmp_path / "best", model=make_model())


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_helpers(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write_text(path, "old ✓")
    assert path.read_text("utf-8") == "old ✓"
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"

    def replace(src, dst):
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        atomic_write_text(path, "never")
    monkeypatch.undo()
    assert path.read_bytes() == b"new"
    assert ckpt_files(tmp_path) == ["report.json"]
    assert ckpt.atomic_write_text is atomic_write_text
