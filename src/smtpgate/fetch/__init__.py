"""Receive connectors that fetch mail: POP3(S) mailboxes at a provider.

Fetched messages enter through the same ingest as SMTP (``fetch.ingest``:
the gateway's session handler, under the connection profile chosen for the
connector) and are deleted from the mailbox only once the queue has committed
them (``fetch.fetcher``); which messages were taken is kept per mailbox by
unique id (UIDL) in ``fetch.state``, with the lease that lets only one node of
a cluster empty a mailbox at a time.
"""
