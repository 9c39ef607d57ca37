"""Data for compression runs: datasets, calibration subsets, data-free calibration."""
