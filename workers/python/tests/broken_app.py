"""An app module whose import fails: drover_wsgi must exit 3 with the traceback."""
raise ImportError("broken_app cannot be imported (on purpose)")
