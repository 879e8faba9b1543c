"""The engine: data preparation, training, checkpoints, outputs and resuming.

It drives what the kernel declares (``ft.kernel``); the kernel never imports it.
"""
