"""``python -m gconvgen ...``: the command line (gconvgen.cli), for a checkout that is not installed."""
from .cli import main

main(prog_name="gconvgen")
