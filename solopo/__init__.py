"""solopo: Short-to-Long Preference Optimization (SoLoPO) for long-context alignment."""

from solopo.hardware import passive_openmp_wait

__version__ = "0.1.0"

# Before anything imports torch: OpenMP reads its wait policy once, at load.
passive_openmp_wait()
