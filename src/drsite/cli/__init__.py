"""The ``drsite`` command line (Typer): thin, one module per command group."""
