"""``fastadapt bench``: verification on the machine at hand, then every op timed against every
baseline and the floor (:mod:`.runner`), over one list of cases (:mod:`.cases`)."""
