"""The ``meshhealth`` command line."""
