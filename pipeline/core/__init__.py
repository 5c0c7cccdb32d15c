"""What the stages share whatever the modality: the data set, the modality seam, training, the
model card, a saved model, drift, Data Docs, source folders, progress lines, a stage's code, the
registries of named variants and the pruning methods."""
