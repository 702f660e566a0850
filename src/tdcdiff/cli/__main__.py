"""`python -m tdcdiff.cli`: the tdcdiff command."""

from . import main

main()
