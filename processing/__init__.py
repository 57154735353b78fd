"""Processing provider and algorithms: every Lookalike job in the toolbox and qgis_process."""
