"""LightningDataModules of the finetuning stage (vision, DomainNet, NLI, cross-lingual, demo).

Every datamodule exposes ``task``, ``label_names`` and ``templates`` (format strings with one
``{}``, or None) and yields dict batches with ``labels`` plus the model inputs.
"""
