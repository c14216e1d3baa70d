"""Data: Kaggle records and false colour (:mod:`.records`), synthetic data (:mod:`.synth`),
caches (:mod:`.cache`), the loader (:mod:`.loader`), splits (:mod:`.splits`)."""
