"""ezmia: privacy audits of fine-tuned LLM checkpoints with EZ-MIA, at cluster scale.

Packages by layer, lowest first; a module imports only its own layer and those below
(``tests/test_layers.py`` keeps it so):

- ``errors``: the one-line errors users act on
- ``stats``: the attack's math, pure (scores, metrics, epsilon bound, blind baseline)
- ``data``: storage (local and S3), datasets, tokenization, schemas, locks, output location
- ``config``: every option, declared once (pydantic); the CLI's flags are generated from it
- ``plan``: models, memory plans, the audit plan, all checked before anything runs
- ``backends``: the two forward passes (PyTorch, vLLM)
- ``engines``: scoring stages in this process or on a Ray cluster
- ``report``: summary, verdict and the HTML report, from score columns only
- ``audit``: ``audit(config) -> AuditResult``, the one entry point
- ``fleet``: many audits (batch, nightly scan, policy, ledger, index)
- ``cli``, ``demo``: the command line and the offline demo
"""

__version__ = "0.1.0"
