"""Evaluation: recommendation, generation and image metrics, baselines, benchmark runners, reports."""
