"""yi-local: run 01.AI's Yi models on your own machine, offline and fast."""

__version__ = "0.1.0"
