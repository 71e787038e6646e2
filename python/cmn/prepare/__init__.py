"""Datasets from their sources: ``cmn-prepare`` writes R2Gen ``annotation.json`` files.

- :mod:`cmn.prepare.iu_xray`: IU X-Ray from the Open-i downloads, selected as the published
  R2Gen annotation;
- :mod:`cmn.prepare.mimic_cxr`: MIMIC-CXR from the PhysioNet files, sections as MIT-LCP's
  section parser, the official split;
- :mod:`cmn.prepare.table`: a user's own studies from a CSV table;
- :mod:`cmn.prepare.common`: the tally of kept and dropped studies, splits, the output
  folder and ``--check``.
"""
