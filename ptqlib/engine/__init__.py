"""Running stages: the one owner of ``runs/<id>/`` (``record``; file names and atomic writes in
``ptqlib.files``), one stage through its notebook (``stage``), pre-loaded kernels (``kernels``),
where stages run (``executors``) and the scheduler (``runner``). Knows nothing of reports."""
