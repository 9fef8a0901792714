"""The command line, the recipe runner and the run report."""
