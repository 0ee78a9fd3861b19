"""Planning an audit before anything runs: resolving and checking models (``models``), GPU
memory plans for model stages (``memory``), and the audit plan itself, datasets and rows
checked before any output is touched (``planner``).

May import: ``ezmia.errors``, ``ezmia.stats``, ``ezmia.data``, ``ezmia.config``.
"""
