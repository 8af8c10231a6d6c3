"""Render the README's performance table from ``benchmarks/results/*.json``.

Run: ``python benchmarks/report.py [--results DIR]``; prints Markdown. Missing result
files are skipped (a row says so); figures measured while other processes used the CPU
(``cpu_load.machine_busy``) are marked with an asterisk.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["render", "main"]


def _load(directory: Path, name: str) -> dict[str, Any] | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _busy(result: dict[str, Any]) -> str:
    return "*" if result.get("cpu_load", {}).get("machine_busy") else ""


def _train_rows(r: dict[str, Any]) -> list[str]:
    rows = []
    for row in r["results"].values():
        b = row["batch_size"]
        rows.append(
            f"| train, batch {b}: vaelab epoch{_busy(r)} | {row['vaelab']['seconds']:.2f} s "
            f"({row['vaelab']['examples_per_second']:,.0f} ex/s) | roofline fraction "
            f"**{row['roofline_fraction']:.2f}** (roofline {row['roofline_seconds']:.2f} s; "
            f"fastest run {row['vaelab']['best_seconds']:.2f} s, fraction "
            f"{row['roofline_fraction_best']:.2f}); "
            f"{row['speedup_vs_dataloader_loop']:.2f}x the DataLoader loop "
            f"({row['dataloader_loop']['seconds']:.2f} s) |")
    return rows


def _eval_rows(r: dict[str, Any]) -> list[str]:
    rows = []
    for row in r["speed"].values():
        rows.append(
            f"| log p(x), K = {row['k']}, {r['examples']} test images{_busy(r)} | "
            f"{row['seconds']:.2f} s ({row['decoded_samples_per_second']:,.0f} decodes/s) | "
            f"roofline fraction **{row['roofline_fraction']:.2f}** (fastest run "
            f"{row['best_seconds']:.2f} s, fraction {row['roofline_fraction_best']:.2f}) |")
    mem = ", ".join(f"K = {m['k']}: +{m['eval_increase_mb']:.0f} MB" for m in r["memory"].values())
    peak = max(m["peak_rss_mb"] for m in r["memory"].values())
    rows.append(f"| log p(x) memory (added by the evaluation) | {mem} | flat in K: "
                f"{'yes' if r['memory_flat_in_k'] else 'NO'}; process peak {peak:.0f} MB |")
    for key, label in (("fixed_mmap_threshold", "glibc mmap threshold fixed at 1 MB"),
                       ("keep_freed", "with `vaelab` commands' allocator settings (freed "
                                      "memory kept)")):
        arm = r.get(f"memory_{key}")
        if arm:
            mem = ", ".join(f"K = {m['k']}: +{m['eval_increase_mb']:.0f} MB" for m in arm.values())
            rows.append(f"| the same, {label} | {mem} | flat in K: "
                        f"{'yes' if r[f'memory_flat_in_k_{key}'] else 'NO'} |")
    return rows


def _conv_rows(r: dict[str, Any]) -> list[str]:
    rows = []
    for name, row in r["results"].items():
        m = row["model"]
        what = (f"{name}: conv {'-'.join(map(str, m['channels']))}, {m['blocks']} residual "
                f"blocks/stage, {m['likelihood']}")
        scaled = row.get("epoch_seconds_50000")
        epoch = (f"; {scaled['vaelab'] / 60:.1f} min per 50,000 images" if scaled else "")
        rows.append(
            f"| {what}, batch {row['batch_size']}: vaelab epoch{_busy(r)} | "
            f"{row['vaelab']['seconds']:.1f} s for {row['examples_per_epoch']:,} images "
            f"({row['vaelab']['examples_per_second']:,.0f} ex/s{epoch}) | roofline fraction "
            f"**{row['roofline_fraction']:.2f}** ({row['flops_per_example']['training_3x_forward'] / 1e6:.0f}"
            f" MFLOP/example; fastest run fraction {row['roofline_fraction_best']:.2f}); "
            f"{row['speedup_vs_plain_loop']:.2f}x the plain loop ({row['plain_loop']['seconds']:.1f} s) |")
    return rows


def render(directory: Path) -> str:
    """The Markdown table (and the machine line) for the results in ``directory``."""
    results = {n: _load(directory, n) for n in ("train", "eval", "memory", "startup", "conv")}
    lines = ["| benchmark | measured | against |", "| --- | --- | --- |"]
    if results["train"]:
        lines += _train_rows(results["train"])
    if results["eval"]:
        lines += _eval_rows(results["eval"])
    if results["conv"]:
        lines += _conv_rows(results["conv"])
    if results["memory"]:
        m = results["memory"]
        lines.append(f"| peak memory, `vaelab train` (default preset, {m['epochs']} epochs"
                     f"{', report' if m['final_report'] else ''}){_busy(m)} | "
                     f"{m['peak_rss_mb']:.0f} MB | target < {m['target_mb']} MB |")
    if results["startup"]:
        s = results["startup"]
        for name, row in s["commands"].items():
            torch_note = "imports torch" if row["imports_torch"] else "no torch import"
            lines.append(f"| `{name}`{_busy(s)} | {row['seconds']:.2f} s | {torch_note} "
                         f"(`import torch` alone: "
                         f"{s['reference']['python -c ' + repr('import torch')]['seconds']:.2f} s)"
                         f" |")
    for name, r in results.items():
        if r is None:
            lines.append(f"| {name} | not run | |")
    first = next((r for r in results.values() if r), None)
    if first:
        m = first["machine"]
        mm = (results["train"] or results["eval"] or {}).get("matmul", {})
        lines.append("")
        lines.append(
            f"Measured on {m['cpu']} ({m['cores']} cores, {m.get('memory_gb', '?')} GB), "
            f"torch {m['torch']} with {m['torch_threads']} threads, Python {m['python']}, "
            f"{m['date'][:10]}; float32 matmul rate {mm.get('gflops', float('nan')):.0f} GFLOP/s "
            f"(2048 x 2048, in the train run). Medians of "
            + ", ".join(f"{r['repeats']} ({n})" for n, r in results.items()
                        if r and "repeats" in r) + " repetitions."
            + (" * measured while other processes used the CPU." if any(
                r and r.get("cpu_load", {}).get("machine_busy") for r in results.values())
               else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    text = render(args.results)
    print(text)
    return text


if __name__ == "__main__":
    main()
