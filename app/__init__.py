"""The desktop window. It imports Qt and the trainer's contract modules (job, events, blocks, data.files) only:
never torch, diffusers or the training code, so it starts fast and a trainer crash cannot take it down."""
