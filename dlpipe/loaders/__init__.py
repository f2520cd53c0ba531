"""Loaders over dlpipe shards: a framework-free core, plus tf.data and PyTorch front ends
(imported lazily, behind the ``tf`` and ``torch`` extras). The options both front ends share,
and their shuffle rule, are ``dlpipe.loaders.options``."""
