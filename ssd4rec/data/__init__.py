"""Datasets: official raw files -> RecBole atomic files (see docs/datasets.md).

Entry points: ``ssd4rec.data.sources.ensure_dataset`` (used by training),
``ssd4rec.data.stats.dataset_stats`` / ``format_stats``, ``ssd4rec.data.download.download``.
"""
