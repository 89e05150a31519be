"""The demo data generator (:mod:`.data`): MIMIC-IT-shaped instructions about generated scenes
and clips. :mod:`.plugin` gives recipes the ``${demo_data}`` placeholder."""
