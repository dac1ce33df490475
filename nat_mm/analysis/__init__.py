"""Measuring models: FLOPs (:mod:`~nat_mm.analysis.flops`), speed and memory against Swin-T
(:mod:`~nat_mm.analysis.benchmark`) and of neighborhood attention alone
(:mod:`~nat_mm.analysis.benchmark_na`)."""
