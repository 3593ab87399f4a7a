"""Experiments: a grid of main-job runs (cells), their summary table and plots.

  grid.py     config.experiment -> cells (one command line and workdir each), their status
  summary.py  finished cells -> W/summary.{md,csv,json}: means over seeds, intervals, paired tests
  plots.py    the figures summary.md shows
"""
