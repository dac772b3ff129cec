"""Benchmark of DecaySGD's factored mode under data parallelism (CPU gloo, 2 processes): bytes
communicated and step time, factor all-gather vs DDP's dense all-reduce, and a projection of the
communication time at NCCL bandwidths. ``cases.py`` holds the model, the launcher and the
projection, ``ranks.py`` one rank's measurement, ``section.py`` the report sections, ``run.py``
the stand-alone run that writes ``results/distributed_factored_<device kind>_<date>``."""
