"""First-party ft plugins. Each module is one plugin, declared as an entry point in group `ft`."""
