"""The built-in attribution metrics (the ``metric`` plugin kind): faithfulness (deletion, insertion, ROAD),
localisation against object masks (mask energy, relevance rank, pointing game) and the sanity checks (cascading,
independent and data randomisation). ``convlens bench attribution`` applies every installed metric to every
installed attribution method."""
