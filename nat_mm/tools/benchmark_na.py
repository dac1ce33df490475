"""Benchmark the na2d backends against Swin-style window attention (and the gather oracle).

    python tools/benchmark_na.py --repeats 5 --threads 2                 # CPU: cpu and torch
    python tools/benchmark_na.py --methods window,cpu,torch,oracle --stages 3
    python tools/benchmark_na.py --device cuda --dtype bfloat16          # flex, natten, torch

What is measured and how: :mod:`nat_mm.analysis.benchmark_na`.
"""

from __future__ import annotations

import argparse
import sys

from nat_mm.analysis.benchmark_na import NABenchmarkSettings, benchmark_na
from nat_mm.tools.cli import run


def _names(text: str) -> tuple[str, ...]:
    return tuple(filter(None, text.split(',')))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = NABenchmarkSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default=defaults.device)
    parser.add_argument(
        '--dtype', default=defaults.dtype, choices=['float32', 'float16', 'bfloat16']
    )
    parser.add_argument('--repeats', type=int, default=defaults.repeats)
    parser.add_argument('--stages', default='1,2,3,4', help='comma-separated stage numbers')
    parser.add_argument('--batch', type=int, default=defaults.batch)
    parser.add_argument('--threads', type=int, default=defaults.threads, help='torch CPU threads')
    parser.add_argument(
        '--methods', default='', help='comma-separated subset (backends, oracle, window)'
    )
    parser.add_argument(
        '--oracle-max-tokens',
        type=int,
        default=defaults.oracle_max_tokens,
        help='skip the gather oracle above this many tokens per image (its memory is K*K x k, v)',
    )
    parser.add_argument('--json', help='also write the rows as JSON to this file')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: benchmark_na(NABenchmarkSettings(
        device=args.device, dtype=args.dtype, repeats=args.repeats,
        stages=tuple(int(s) for s in _names(args.stages)), batch=args.batch,
        threads=args.threads, methods=_names(args.methods),
        oracle_max_tokens=args.oracle_max_tokens, json_path=args.json,
    )))  # fmt: skip


if __name__ == '__main__':
    sys.exit(main())
