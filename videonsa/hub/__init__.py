"""Assembling, verifying and publishing the Hub repository (``push_to_hub.py``, ``videonsa-push``).

:mod:`~videonsa.hub.layout` says what the repository holds, :mod:`~videonsa.hub.convert` plans the weights,
:mod:`~videonsa.hub.checks` checks processor and card, :mod:`~videonsa.hub.write` writes the folder,
:mod:`~videonsa.hub.verify` verifies it, :mod:`~videonsa.hub.upload` publishes it and :mod:`~videonsa.hub.cli` is
the command line.
"""
