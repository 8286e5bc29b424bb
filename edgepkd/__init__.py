"""edgepkd: distill an image classifier into a family of small Mamba students for edge devices.

Layout, in pipeline order (each package imports only the ones before it):
    edgepkd/recipe.py      typed recipe dataclasses, loaded from YAML (config.py: the loader)
    edgepkd/data.py        named datasets and deterministic splits
    edgepkd/models/        teachers, Mamba students, selective-scan backends, ensemble prefixes, FLOP counting
    edgepkd/distill/       losses, the training loop, chain / ensemble orchestration, metrics.json, evaluate
    edgepkd/compress/      export formats and targets, one exporter per format, the runtime adapters (export
                           verification and the device runner run artifacts through them), the manifest
    edgepkd/measure/       device profiles, the standalone runner, bench, pick, the latency table
    edgepkd/workflow.py    the end-to-end chain: recipe -> run -> exports -> bench -> pick
    edgepkd/report.py      metrics.json -> report.md, the accuracy-vs-FLOPs plot, the console tables
    edgepkd/cli.py         the `edgepkd` click command (heavy imports live inside commands)
"""

__version__ = "0.1.0"
