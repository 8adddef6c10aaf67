"""sftcurate: pick the most informative subset of an SFT data set, fine-tune on it, and prove the gain."""

__version__ = "0.1.0"
