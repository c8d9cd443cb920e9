"""One module per pipeline stage; `ssb_jax.pipeline.registry` orders them."""
