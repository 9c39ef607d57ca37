"""Architectures beyond the ResNets in compress.models: the shapes edge models take."""
