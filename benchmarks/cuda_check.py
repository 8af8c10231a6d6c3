"""Benchmark: issue 27's prepared GPU check (mixed precision and compile on CUDA).

On one CUDA device (``--device cpu`` only checks the script, as the smoke test does):

1. **Matrix-multiply rates**, CUDA-synchronised, medians: float32 with TF32 off (what
   vaelab's fp32 runs use: it never turns TF32 on), TF32, bfloat16 and float16, for an
   ``n x n`` product and for the default model's widest layer at batch 128 (128 x 784 @
   784 x 512).
2. **Training**: the ``default`` preset (or ``--preset``), ``--epochs`` epochs at one seed,
   with ``train.precision`` = fp32, bf16 (where the GPU has bfloat16) and fp16 (CUDA only,
   with its gradient scaler), each eager and with ``train.compile=true``: seconds of the
   first epoch (which compiles) and the median of the others, the precision
   ``metrics.jsonl`` recorded, fp16's last gradient scale, and the test NELBO evaluated in
   float32 on the CPU with its paired difference to fp32 eager (issue 27: within 0.5 nats).
   A run that fails (compile without a working Triton, say) is kept as its exception's
   type and first line, and the check goes on.
3. **The plain loop** of ``benchmarks/train.py`` on the device (fp32 and bf16,
   ``--repeats`` epochs each, from a fresh model seeded as vaelab seeds it): vaelab's steady
   epoch against it. vaelab reads the loss once per step for its NaN and divergence
   checks; the plain loop never waits for the GPU inside its epoch.

Once ``--deadline`` seconds have passed, the runs left are skipped and said so; the JSON is
rewritten after every run, so a command stopped at its time limit still returns what it
measured.

Run (the device tool; the data and three pure-Python wheels travel in an ignored folder;
see benchmarks/README.md for preparing ``.device``)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/*.whl &&
    PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/cuda_check.py
        --data-dir .device --deadline 240 --out $OUT/cuda_check.json

``--smoke``: 256 images, 2 epochs, no compile unless ``--compile-smoke``; figures mean nothing.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["main", "device_matmul_rate"]

PRECISIONS = ("fp32", "bf16", "fp16")


def device_matmul_rate(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
                       *, tf32: bool = False, repeats: int = 5, min_seconds: float = 0.2
                       ) -> dict[str, Any]:
    """GFLOP/s of ``(m, k) @ (k, n)`` products on ``device``: :func:`common.matmul_rate`
    (synchronised after every 10 products on a GPU) with ``tf32``: TF32 allowed for float32
    (restored after)."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        rate = common.matmul_rate(repeats=repeats, min_seconds=min_seconds, dtype=dtype,
                                  shape=shape, device=device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return {**rate, "tf32": tf32}


def _matmul_rates(device: torch.device, n: int, repeats: int, min_seconds: float
                  ) -> dict[str, Any]:
    kinds = [("fp32", torch.float32, False), ("tf32", torch.float32, True),
             ("bf16", torch.bfloat16, False)]
    if device.type == "cuda":
        kinds.append(("fp16", torch.float16, False))
    out: dict[str, Any] = {}
    for label, dtype, tf32 in kinds:
        if tf32 and device.type != "cuda":
            continue
        for shape_name, shape in (("square", (n, n, n)), ("batch_128_layer", (128, 784, 512))):
            out[f"{label} {shape_name}"] = device_matmul_rate(
                device, dtype, shape, tf32=tf32, repeats=repeats, min_seconds=min_seconds)
    return out


def _gpu(device: torch.device) -> dict[str, Any] | None:
    """The GPU the check runs on (None on the CPU)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16_supported": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda,
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def _runs_wanted(device: torch.device, compile_too: bool) -> list[tuple[str, bool]]:
    precisions = [p for p in PRECISIONS if device.type == "cuda" or p != "fp16"]
    wanted = [(p, False) for p in precisions]
    if compile_too:
        wanted += [(p, True) for p in precisions]
    return wanted


def _train_one(cfg, run_dir: Path, data) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Train ``cfg`` into ``run_dir``; ``(row, per-example test NELBO)``, or ``({"error":
    the exception's type and first line}, None)`` when the run failed: a one-shot check on
    a lent GPU keeps going to the next run rather than lose it."""
    from vaelab.train import train_and_evaluate

    started = time.perf_counter()
    try:
        train_and_evaluate(cfg, run_dir, progress=False, echo=lambda _line: None, data=data)
    except Exception as error:  # noqa: BLE001 - recorded, and the check goes on
        first_line = (str(error).strip().splitlines() or [""])[0][:500]
        return {"error": f"{type(error).__name__}: {first_line}"}, None
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows]
    nelbo = common.run_test_nelbo(run_dir, cfg)
    out = {
        "first_epoch_seconds": seconds[0],
        "steady_epoch_seconds": common.median(seconds[1:]) if len(seconds) > 1 else None,
        "epoch_seconds": seconds, "wall_seconds": round(wall, 2),
        "precision_recorded": sorted({r["precision"] for r in rows}),
        "train_objective_per_epoch": [r["train_objective"] for r in rows],
        "val_nelbo_last": rows[-1].get("val_nelbo"),
        "test_nelbo": float(nelbo.mean()),
        "test_nelbo_stderr": float(nelbo.std() / math.sqrt(len(nelbo))),
        "test_examples": len(nelbo),
    }
    if "grad_scale" in rows[-1]:
        out["grad_scale_last"] = rows[-1]["grad_scale"]
    return out, nelbo


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "cuda_check")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu "
                        "(checks the script only)")
    parser.add_argument("--preset", default=None, help="a preset (default: the defaults)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-limit", type=int, default=None,
                        help="training images (default: the whole training split)")
    parser.add_argument("--dataset", default=None, help="data.dataset (default: the preset's)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the dataset's files (data.data_dir)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the train.compile=true runs")
    parser.add_argument("--compile-smoke", action="store_true",
                        help="with --smoke: run the compiled runs too")
    parser.add_argument("--deadline", type=float, default=240.0,
                        help="seconds after which the runs left are skipped (default 240)")
    parser.add_argument("--matmul-n", type=int, default=8192)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from vaelab import config
    from vaelab.data import Splits
    from vaelab.errors import ConfigError
    from vaelab.runtime import select_device

    try:
        device = select_device(args.device)
    except ConfigError as error:
        parser.exit(2, f"cuda_check: {error}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    smoke = args.smoke
    epochs = 2 if smoke else args.epochs
    limit = 256 if smoke else args.train_limit
    repeats = args.repeats or (1 if smoke else 3)
    monitor = common.CpuMonitor()
    result: dict[str, Any] = {
        "benchmark": "cuda_check", "smoke": smoke, "device": str(device), "gpu": _gpu(device),
        "preset": args.preset or "default", "epochs": epochs, "train_limit": limit,
        "matmul": None, "runs": {}, "plain_loop": {}, "machine": common.machine(),
    }

    def save(final: bool = False) -> None:
        """The JSON so far, written (printed too at the end) after every run."""
        result["elapsed_seconds"] = round(time.perf_counter() - started, 1)
        result["cpu_load"] = monitor.report()
        common.write_result(result, args.out, "cuda_check", smoke, echo=final, note=args.note)

    n = 256 if smoke else args.matmul_n
    result["matmul"] = _matmul_rates(device, n, repeats=1 if smoke else 5,
                                     min_seconds=0.01 if smoke else 0.2)
    save()

    overrides = [f"train.device={device}", f"train.epochs={epochs}"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    if limit is not None:
        overrides.append(f"data.train_limit={limit}")
    if args.dataset:
        overrides.append(f"data.dataset={args.dataset}")
        if Path(args.dataset).suffix in (".npz", ".npy"):
            overrides += ["data.validation_size=32", "data.test_size=64"]
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")

    def run_config(precision: str, compiled: bool):
        return config.resolve(preset=args.preset, overrides=[
            *overrides, f"train.precision={precision}", f"train.compile={str(compiled).lower()}"])

    base = run_config("fp32", False)
    data = Splits(base.data, base.train.seed, device)  # loaded once, shared by every run
    nelbo_of: dict[str, torch.Tensor] = {}
    compile_too = not args.no_compile and (not smoke or args.compile_smoke)
    with tempfile.TemporaryDirectory(prefix="vaelab-cuda-check-") as tmp:
        for precision, compiled in _runs_wanted(device, compile_too):
            key = f"{precision} {'compiled' if compiled else 'eager'}"
            if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                result["runs"][key] = {"skipped": "this GPU has no bfloat16"}
                continue
            if time.perf_counter() - started > args.deadline:
                result["runs"][key] = {"skipped": f"past the {args.deadline:.0f} s deadline"}
                continue
            row, nelbo = _train_one(run_config(precision, compiled),
                                    Path(tmp) / key.replace(" ", "-"), data)
            if nelbo is not None:
                nelbo_of[key] = nelbo
                if "fp32 eager" in nelbo_of and key != "fp32 eager":
                    diff = nelbo_of[key] - nelbo_of["fp32 eager"]
                    row["test_nelbo_minus_fp32_eager"] = float(diff.mean())
                    row["paired_stderr"] = float(diff.std() / math.sqrt(len(diff)))
            result["runs"][key] = row
            save()
        result["target_nats"] = 0.5
        _plain_loops(result, device, run_config, data, repeats, started, args.deadline)
    save(final=True)
    return result


def _plain_loops(result: dict[str, Any], device: torch.device, run_config, data,
                 repeats: int, started: float, deadline: float) -> None:
    """The plain loop's epochs beside vaelab's steady eager epoch, per precision."""
    import train as train_bench

    train_set = data["train"]
    images = train_set.images if train_set.levels == 256 else train_set.images * 255  # 0/1
    for precision in ("fp32", "bf16"):
        vaelab_row = result["runs"].get(f"{precision} eager", {})
        if vaelab_row.get("steady_epoch_seconds") is None:
            continue
        if time.perf_counter() - started > deadline:
            result["plain_loop"][precision] = {"skipped": f"past the {deadline:.0f} s deadline"}
            continue
        cfg = run_config(precision, False)
        timings, losses = [], []
        for repeat in range(repeats):
            seconds, loss = train_bench.plain_epoch(cfg, images, seed=repeat, device=device)
            timings.append(seconds)
            losses.append(loss)
        row = common.summarize(timings, examples=images.shape[0])
        row["mean_loss_first_epoch"] = losses[0]
        row["vaelab_vs_plain_loop"] = round(row["seconds"] / vaelab_row["steady_epoch_seconds"],
                                            3)
        result["plain_loop"][precision] = row


if __name__ == "__main__":
    main()
