"""`python -m ssb_jax.plan`: the planner's command line (ssb_jax.plan.cli)."""
from ssb_jax.plan.cli import main

main()
