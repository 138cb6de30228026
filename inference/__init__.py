"""Inference side of pacs-agent: imaging, radiomics, models and pipelines.

Never imports pynetdicom: results leave this package as plain dataclasses (:mod:`inference.results`).
"""
