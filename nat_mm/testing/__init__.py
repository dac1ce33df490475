"""Helpers for nat_mm's tests: an independent reference implementation of the NAT / DiNAT backbone
(:mod:`nat_mm.testing.nat_reference`), written from the paper's spec with no nat_mm imports, and
one of DiNAT_s written from upstream's code (:mod:`nat_mm.testing.dinats_reference`)."""
