"""Benchmark the FP32 export of a model: export time, parity with PyTorch, prefill and decode speed.

Prints one table; every figure is measured in this run. Usage:
    python bench/bench_export.py [MODEL] [--seq-len 512] [--decode-tokens 64] [--windows 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import qexport
from qexport.evaluation.benchmark import BenchSettings, bench
from qexport.evaluation.perplexity import EvalSettings
from qexport.artifact.outdir import read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = qexport.export(args.model, Path(tmp) / "fp32")
        export_info = read_manifest(out)["export"]
        quality = qexport.evaluate(out, settings=EvalSettings(windows=args.windows, seq_len=args.seq_len, threads=2))
        speed = bench(out, BenchSettings(seq_len=args.seq_len, decode_tokens=args.decode_tokens, runs=args.runs))
    report = {"export": export_info, "quality": quality, "speed": speed}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    ort, torch_row = speed["results"]["onnxruntime-cpu"], speed["results"]["pytorch"]
    print(f"export: {export_info['total_seconds']:.1f} s (load {export_info['load_seconds']:.1f} s, "
          f"graph {export_info['export_seconds']:.1f} s), peak memory {export_info['peak_memory_mib']:.0f} MiB, "
          f"{export_info['nodes']} nodes")
    print(f"parity over {quality['windows']} x {quality['seq_len']} tokens: max |dlogit| {quality['max_abs_logit_diff']:.2e}, "
          f"cosine {quality['logit_cosine']:.8f}, greedy {quality['greedy_match']}/{quality['greedy_tokens']}")
    print()
    header = f"| {'runtime (2 threads)':<22} | {'ppl':>8} | {'ppl ratio':>9} | {'prefill ms':>10} | {'prefill vs ORT FP32':>19} | {'decode tok/s':>12} | {'decode vs ORT FP32':>18} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    rows = [("onnxruntime fp32", quality["ppl"], ort), ("pytorch fp32", quality["ppl_reference"], torch_row)]
    for name, ppl, row in rows:
        print(f"| {name:<22} | {ppl:>8.4f} | {ppl / quality['ppl']:>9.6f} | {row['prefill_ms']:>10.1f} | "
              f"{ort['prefill_ms'] / row['prefill_ms']:>19.2f} | {row['decode_tokens_per_s']:>12.1f} | "
              f"{row['decode_tokens_per_s'] / ort['decode_tokens_per_s']:>18.2f} |")


if __name__ == "__main__":
    main()
