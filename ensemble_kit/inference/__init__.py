"""Inference: TTA shared by OOF and submission, checkpoints, submit, the submission CSV and
RLE, export."""
