"""Training: one engine (holst.train.engine) for every backend and precision, and one trainer per stage.

Inference code never imports this package. Trainer modules are imported lazily by the CLI.
"""
