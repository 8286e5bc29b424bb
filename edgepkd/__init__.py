"""edgepkd: distill an image classifier into a family of small Mamba students for edge devices.

Layout (one concern per place):
    edgepkd/recipe.py      typed recipe dataclasses, loaded from YAML
    edgepkd/data.py        named datasets and deterministic splits
    edgepkd/models/        teachers, Mamba students, selective-scan backends
    edgepkd/distill/       losses, the training loop, chain / ensemble orchestration
    edgepkd/measure/       analytic FLOP / parameter / size accounting
    edgepkd/report.py      metrics.json, report.md and the accuracy-vs-FLOPs plot
    edgepkd/cli.py         the `edgepkd` command (heavy imports live inside commands)
"""

__version__ = "0.1.0"
