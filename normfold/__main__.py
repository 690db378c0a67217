"""`python -m normfold` runs the command line, as `normfold` does."""

from normfold.cli.main import main

main()
