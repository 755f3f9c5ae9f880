"""Compare the speed of exported folders on ONNX Runtime CPU: interleaved rounds, fresh sessions, medians.

Prints one table; every figure is measured in this run. Prefill is one prompt of ``--seq-len`` tokens; decode is
``--decode-tokens`` tokens after a ``--prompt``-token prompt (KV cache). Usage:
    python bench/bench_folders.py DIR [DIR ...] [--rounds 3] [--seq-len 512] [--prompt 128] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics

from qexport.artifact.folder import Artifact
from qexport.evaluation.benchmark import BenchSettings, time_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    prefill = BenchSettings(seq_len=args.seq_len, decode_tokens=0, runs=3, threads=args.threads, reference=False)
    decode = BenchSettings(seq_len=args.prompt, decode_tokens=args.decode_tokens, runs=2, threads=args.threads,
                           reference=False)
    samples: dict[str, dict[str, list[float]]] = {f: {"prefill_ms": [], "decode_tokens_per_s": []} for f in args.folders}
    for _ in range(args.rounds):
        for folder in args.folders:  # a fresh session per folder and round
            artifact = Artifact.open(folder)
            lm = artifact.causal_lm("ort-cpu", threads=args.threads)
            vocab = int(artifact.tokenizer().vocab_size)
            samples[folder]["prefill_ms"].append(time_model(lm, vocab, prefill)["prefill_ms"])
            samples[folder]["decode_tokens_per_s"].append(time_model(lm, vocab, decode)["decode_tokens_per_s"])
            del lm
    medians = {f: {k: statistics.median(v) for k, v in row.items()} for f, row in samples.items()}
    if args.json:
        print(json.dumps({"medians": medians, "samples": samples}, indent=2))
        return
    print(f"{'folder':<40}{'prefill ms (' + str(args.seq_len) + ')':>22}{'decode tok/s':>16}   (medians of {args.rounds})")
    for folder, row in medians.items():
        print(f"{folder:<40}{row['prefill_ms']:>22.1f}{row['decode_tokens_per_s']:>16.1f}")


if __name__ == "__main__":
    main()
