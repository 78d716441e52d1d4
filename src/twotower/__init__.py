"""twotower: two-tower recommenders for retrieval and debiased ranking."""

__version__ = "0.1.0"
