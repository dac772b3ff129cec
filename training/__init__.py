"""The training harness: CIFAR-10 data on the device (``training.data``), the papers' models
behind a registry (``training.models``), crash-safe checkpoints (``training.checkpoint``) and the
training script ``training/train.py`` (``training.train.main``)."""
