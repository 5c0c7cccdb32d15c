"""What the stages share whatever the modality: the data set, the modality seam, training, the
model card, a saved model, drift, Data Docs, source folders, progress lines, a stage's code."""
