"""edge-compress: distill, prune, quantize, export and measure models for edge runtimes."""
__version__ = "0.1.0"
