"""ensemble-kit: K-fold training, OOF blending and Kaggle submissions for segmentation."""

__version__ = "0.2.0"
