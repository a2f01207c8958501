"""What a study is, before anything runs (torch-free): the stage parameters (``params``), the study
file's schema, grids and claims (``schema``, ``checks``), choices made on validation (``selection``)
and the content-addressed stage graph (``graph``)."""
