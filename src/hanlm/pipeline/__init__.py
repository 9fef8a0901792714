"""The command line, the recipe runner and the run report."""

from hanlm.stage import Command

COMMANDS = (
    Command(
        "run",
        "hanlm.pipeline.recipe",
        "RunConfig",
        "run a recipe's stages (skip unchanged, resume interrupted) and write a report",
        positional="recipe",
        usage="NAME or RECIPE.yaml",
        aliases=(("from", "from_stage"),),
    ),
)
