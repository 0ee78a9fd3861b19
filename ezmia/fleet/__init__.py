"""Many audits: the org-wide batch (``batch``), the nightly scan of a registry (``scan``,
``registry``), its policy and verdicts (``policy``), ledger (``ledger``) and the audit index
analysts query (``index``).

May import: everything below, ``ezmia.audit`` included.
"""
