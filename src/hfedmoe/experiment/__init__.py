"""Experiments over many runs: the comparison grid behind ``hfedmoe compare`` (``comparison``)
and the report behind ``hfedmoe report`` (``report``)."""
