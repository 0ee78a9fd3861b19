"""What an audit tells a reader, from its score columns only: the summary, metrics and
verdict (``summary``, typed in ``model``), the self-contained HTML report from its template
(``html``, ``templates/``) and the one writer of both, shared by an audit and ``ezmia report``
(``publish``).

May import: ``ezmia.errors``, ``ezmia.stats``, ``ezmia.data``, ``ezmia.config``.
"""
