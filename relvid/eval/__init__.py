"""Evaluation: judges, metrics, the report and the evaluate command's logic."""
