"""Tools around the VideoNSA Hub model: training, long-video inference, analysis, publishing and evaluation.

The model itself (``configuration_videonsa``, ``modeling_videonsa``, ``processing_videonsa``, ``nsa_kernels``) is the
Hub repository's code at the root of this checkout; installing this project makes those modules importable too.
"""
