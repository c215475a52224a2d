"""Pure policy functions over an immutable configuration.

No asyncio, no sockets, no database: facts in, a typed verdict out, with the
reason that ``policy explain`` and the log show.
"""
