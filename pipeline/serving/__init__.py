"""The BentoML service a Bento ships (no torch): REST, gRPC (Open Inference Protocol), request
guards, refusals, the API page, and stop-on-bad-model."""
