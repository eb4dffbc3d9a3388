"""Foundations: the one error type users see, typed configs, crash-safe files and bounded reads, derived seeds,
this process's place among workers and ranks, and the one lifecycle of every output (`outputs.judge`).

Imports nothing of moekd.
"""
