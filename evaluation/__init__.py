"""Evaluation: accuracy-vs-compute matrices (`lodestar eval`) and systems measurements
(`lodestar bench`)."""
