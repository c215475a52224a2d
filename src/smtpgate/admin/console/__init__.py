"""The web console (``smtpgate.admin.console.app``)."""
