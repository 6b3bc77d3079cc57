"""Training: the one loop every experiment shares, and pretraining from scratch.

==============  ==================================================================
``loop``        :func:`~lance_lib.training.loop.train_epoch` and
                :func:`~lance_lib.training.loop.evaluate`, for fine-tuning,
                pretraining, transformers and continual tasks alike
``pretrain``    a backbone trained from scratch on a class split, resumable, cached
==============  ==================================================================

Nothing here imports :mod:`lance_lib.continual` or :mod:`lance_lib.experiments`: both
build on it.
"""
