"""Datasets: official raw files -> RecBole atomic files (see the README, section Datasets).

Entry points: ``ssd4rec.data.sources.ensure_dataset`` (used by training),
``ssd4rec.data.stats.dataset_stats`` / ``format_stats``, ``ssd4rec.data.download.download``.
"""
