"""mrsynth: translate brain MR images between contrasts with GANs, and judge the results."""

__version__ = "0.1.0"
