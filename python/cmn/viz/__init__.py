"""Pictures of runs and results: training curves (``cmn-plot``), the ``cmn-eval --html`` page,
and the page helpers :mod:`cmn.explain` shares."""
