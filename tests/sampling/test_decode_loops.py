"""The lowered sampling program: its decode loops are the only loops whose trip count depends on data.

On GPU each iteration of a while loop whose trip count XLA cannot know copies the predicate to the
host and waits; inside the decode step that would be once per cache block, layer and token. The
decode loop itself (stop when every row is done) is the one place such a loop belongs."""
import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ssb_jax.model.config import ModelConfig
from ssb_jax.model.kv_cache import decode_phases
from ssb_jax.model.qwen2 import init_model
from ssb_jax.sampling.decode_layout import to_decode_layout
from ssb_jax.sampling.sampler import SamplingParams, generate, row_keys_for
from tests.xla_text import has_static_trip_count, loops_reachable, stablehlo_functions, while_loops

SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, cache_block=4)


@pytest.mark.parametrize("layout,mode", [("scan", dict(temperature=0.0)),
                                         ("decode", dict(temperature=0.8, top_k=5, top_p=0.9))])
def test_decode_step_has_no_data_dependent_loop(layout, mode):
    """Prompt 8 and 20 new tokens in blocks of 4 slots: 3 decode phases (12, 24 and 28 slots), each a
    while loop in the program's main function; inside them only loops of static trip count (the layer
    scan, the scan over cache blocks)."""
    model = init_model(SMALL, 0)
    model = to_decode_layout(model) if layout == "decode" else model
    graphdef, state = nnx.split(model)
    prompt, new, rows = 8, 20, 2
    sampling = SamplingParams(max_new_tokens=new, **mode)
    program = jax.jit(functools.partial(generate, graphdef, sampling=sampling))
    text = program.lower(nnx.to_pure_dict(state), jnp.zeros((rows, prompt), jnp.int32), jnp.ones((rows, prompt), bool),
                         row_keys_for(0, range(rows), 1)).as_text()
    functions = stablehlo_functions(text)
    main = functions["main"]
    top = min(loop["indent"] for loop in while_loops(main))
    decode_loops = [loop for loop in while_loops(main) if loop["indent"] == top and not has_static_trip_count(loop)]
    assert len(decode_loops) == len(decode_phases(prompt, new, SMALL.cache_block)) == 3
    inside = [loop for decode in decode_loops for loop in loops_reachable(decode["body"], functions)]
    assert inside, "expected the scans over layers or cache blocks inside the decode step"
    dynamic = [loop["cond"] for loop in inside if not has_static_trip_count(loop)]
    assert not dynamic, f"{len(dynamic)} loops with a data-dependent trip count in the decode step: {dynamic[0]}"
