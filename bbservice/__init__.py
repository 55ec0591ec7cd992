"""bbservice: gated LSTMs with (bivariate) Beta gates for captions and music."""

__version__ = "0.1.0"
