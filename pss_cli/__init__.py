"""pss: diagnose and repair singular weight spectra in neural-network checkpoints.

Importing this package must stay cheap: it never imports torch (``pss --help`` relies on it).
"""

__version__ = "0.1.0"
