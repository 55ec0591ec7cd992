"""Models built on the gated LSTM."""
