"""Inference: TTA shared by OOF and submission, checkpoints, predicting a split with loaded
models (:mod:`.ensemble`), submit, the submission CSV and RLE, export, the prediction bundle
(:mod:`.bundle`) and the Kaggle dataset (:mod:`.kaggle`)."""
