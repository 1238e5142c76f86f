"""Thin entry points: each parses its arguments and calls library functions."""
