"""``python -m gconvgen ...``: the command line (gconvgen.tools.cli), for a checkout that is not installed."""
from .tools.cli import main

main(prog_name="gconvgen")
