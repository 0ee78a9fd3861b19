"""Scoring engines that take a finished plan: the stages shared by both engines
(``scoring``), this process (``local``) and a Ray cluster, one actor pool per model stage
(``pipeline``). Engines never import the audit, the report or the fleet above them.

May import: everything below: ``ezmia.errors``, ``ezmia.stats``, ``ezmia.data``,
``ezmia.config``, ``ezmia.plan``, ``ezmia.backends``.
"""
