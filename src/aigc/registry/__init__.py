"""The model registry: export a run, register it as ``aigc-<family>``, gate its promotion to the
``production`` alias, roll back, and read a version's lineage. See ``aigc.registry.register`` and
``aigc.registry.gate``; serving follows the aliases (``aigc.serving``)."""
