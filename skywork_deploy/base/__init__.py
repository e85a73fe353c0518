"""The shared base every stage stands on: errors, the model spec, manifests, safe file writing, memory policy,
progress and logging, the streamed torch reference and random checkpoints. It imports no stage."""
