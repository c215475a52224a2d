"""The ``smtpgate`` command line."""
