"""Distillation: the KD loss (``losses``), one training stage (``trainer``), and the progressive
chain / ensemble orchestration over a whole recipe (``pipeline``)."""
