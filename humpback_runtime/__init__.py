"""humpback: instruction backtranslation (Li et al. 2023) as a pipeline of resumable stages."""

__version__ = "0.1.0"
