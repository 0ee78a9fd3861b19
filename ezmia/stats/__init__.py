"""The attack and its statistics, pure math with no I/O: the EZ score and the baselines from
per-position statistics (``scores``, one registry), the metrics of a labelled audit
(``metrics``), the empirical epsilon bound (``epsilon``) and the blind text-only baseline
(``blind``).

May import: ``ezmia.errors`` only (and numpy, scipy, scikit-learn).
"""
