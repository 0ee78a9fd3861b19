"""Where bytes live and what they look like: local paths and S3 behind one API (``storage``),
Parquet datasets as fragments (``datasets``), tokenization (``text``), the Parquet schemas of
scores, index and ledger (``schema``), lock objects (``locks``) and the audit output
location with its manifest (``outputs``).

May import: ``ezmia.errors``, ``ezmia.stats``.
"""
