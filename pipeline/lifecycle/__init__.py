"""A model after the gate: the champion record and exported Bentos, rollback, and a Bento served
for as long as its caller lives (infra validation)."""
