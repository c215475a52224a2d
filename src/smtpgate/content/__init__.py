"""Content security: what the gateway checks in a message before its 250.

Each check (spam by rspamd, viruses by clamd, sender authentication) is a
``Scanner`` in its own module; ``pipeline.scan`` runs those that apply to a
message concurrently on the spooled body and combines their results into
one ``Outcome`` (``verdict.combine``). The gateway's handler acts on it:
refuse (5xx), defer (4xx), quarantine, or queue with added headers.
Recipient validation happens earlier, at RCPT (``recipients``).
"""
