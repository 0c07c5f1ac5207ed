"""One module per CLI command group, each a Typer app registered in meterline.cli."""
