"""Developer tools: the pytest plugin for plugin authors (``testing``), tiny models (``tiny``) and
``ft debug`` helpers. Neither the kernel nor the engine imports them.
"""
