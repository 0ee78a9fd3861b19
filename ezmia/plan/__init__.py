"""Planning an audit before anything runs: model files on this machine (``fetch``), the
refusals before anything loads (``checks``), the model plan and loading (``models``), GPU
memory plans for model stages (``memory``), and the audit plan itself, datasets and rows
checked before any output is touched (``planner``).

May import: ``ezmia.errors``, ``ezmia.stats``, ``ezmia.data``, ``ezmia.config``.
"""
