"""Analyses of trained models (figures and statistics of the papers)."""
