"""The kernel: what plugins and the pipeline are made of.

Hook declarations and the one generic hook caller (``hooks``), the plugin manager and plugin
declarations (``plugins``), config, registries, methods and errors. The kernel never imports the
engine (``ft.engine``: data, training, checkpoints, outputs) nor the developer tools
(``ft.tools``); a test checks it.
"""
