"""What a study found: results and units tables from the runs (``tables``), claims and their
intervals (``analysis``, ``inference``), the README's findings (``findings``). Reads the graph and the
runs; never schedules."""
