"""Text-to-image training (`model.task: text-to-image`): an image folder with captions, the noise-prediction
loss on a diffusers pipeline's denoiser, per-component adapters, and sampling PNGs with `deltatune generate`.
diffusers is imported lazily (the `diffusion` extra), so text runs never need it."""
