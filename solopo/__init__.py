"""solopo: Short-to-Long Preference Optimization (SoLoPO) for long-context alignment."""

__version__ = "0.1.0"
