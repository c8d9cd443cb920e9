"""The planner's memory figures equal the real per-device sizes of sharded arrays on a tiny model."""
import json
import random
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ssb_jax.config import base_config, load_config_file
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.kv_cache import CACHE_AXES
from ssb_jax.model.qwen2 import abstract_model, init_model
from ssb_jax.plan import analytic, cli
from ssb_jax.plan.accelerators import ACCELERATORS, Accelerator
from ssb_jax.plan.analytic import SamplingShape, cache_shape, plan
from ssb_jax.plan.cli import format_plan
from ssb_jax.plan.compiled import check_against_compiler, compiled_bytes
from ssb_jax.sharding import array_bytes_per_device, make_mesh, named_sharding, shard_state, state_bytes_per_device

TINY = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8)


def device0_bytes(tree):
    """Bytes of the shards that live on the first device."""
    first = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == first)


@pytest.mark.multidevice
def test_memory_figures_match_sharded_arrays():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    axes = dict(mesh.shape)
    params = shard_state(nnx.state(init_model(TINY, 0)), mesh)
    assert state_bytes_per_device(nnx.state(abstract_model(TINY)), axes) == device0_bytes(params)
    assert device0_bytes(params) < TINY.param_count() * 4 / 2  # really split

    from ssb_jax.model.lora import LoraConfig, init_lora, student_split
    lora_config = LoraConfig(rank=4)
    lora = init_lora(TINY, lora_config, jax.random.key(1), mesh)
    assert state_bytes_per_device(student_split(TINY, lora_config)[1], axes) == device0_bytes(lora)

    shape = cache_shape(TINY, 8, 24)
    k = jax.device_put(np.zeros(shape, np.float32), named_sharding(CACHE_AXES["k"], shape, mesh))
    assert array_bytes_per_device(CACHE_AXES["k"], shape, axes, 4) == device0_bytes(k)
    assert device0_bytes(k) == k.nbytes // 8  # batch over data x fsdp, kv heads over tensor


def test_plan_end_to_end_and_fit_verdicts(tmp_path, monkeypatch):
    monkeypatch.setitem(ACCELERATORS, "tiny-4", Accelerator(4, 0.001, 1.0, 1.0))
    c = base_config()
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    c.model.path = str(directory)
    c.model.dtype = "float32"
    c.sampler.batch_size = 4
    c.sampler.max_prompt_tokens = 64
    c.curate.rollout_max_new_tokens = c.curate.solution_max_new_tokens = 64
    result = plan(c, "tiny-4")
    m = result["memory_gib_per_device"]
    params_bytes = TINY.param_count() * 4
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert m["base_weights"] * 2**30 <= params_bytes  # sharded over fsdp
    assert m["base_weights"] * 2**30 >= params_bytes / 4
    assert result["fits"]["sampling"] is True  # ~1 MiB of capacity holds this toy's weights and cache
    big = ml_collections.ConfigDict(c.to_dict())
    big.sampler.batch_size = 4096
    assert plan(big, "tiny-4")["fits"]["sampling"] is False
    assert "DOES NOT FIT" in format_plan(plan(big, "tiny-4"))


def test_real_3b_config_on_h100():
    from ssb_jax.paths import shared_data_path
    c = base_config()
    c.model.path = str(shared_data_path("qwen2.5_configs", "Qwen2.5-3B-Instruct"))
    result = plan(c, "H100-80G", include_eval=False)
    # 3.09B parameters in bf16 on one device
    assert abs(result["memory_gib_per_device"]["base_weights"] * 2**30 - 2 * result["model_parameters"]) < 1e6
    assert result["model_parameters"] == 3085938688
    assert "H100-80G" in ACCELERATORS and np.isfinite(result["time_estimate_s"]["train"])
    # the planned stages are the registry's reading of config.stages, with what each asks of the devices
    assert result["stages"] == {"curate": ("sampling",), "teacher_cache": (), "train": ("training",),
                                "eval": ("sampling",), "export": (), "report": ()}
    c.stages = "grpo,eval"
    assert plan(c, "H100-80G", include_eval=False)["stages"] == {"grpo": ("sampling", "training"),
                                                                 "eval": ("sampling",)}


def test_plan_command_line_applies_overrides_and_names_a_typo(tmp_path, capsys, seed):
    """python -m ssb_jax.plan takes the same --config.key=value overrides as ssb_jax.main."""
    batch = random.Random(seed).randint(5, 64)  # qwen3b's own is 4
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    config_file = str(Path(__file__).resolve().parents[2] / "configs" / "qwen3b.py")
    common = ["--config", config_file, f"--config.model.path={model_dir}", "--accelerator", "H200"]
    cli.main(common)
    default_out = capsys.readouterr().out
    cli.main(common + [f"--config.train.batch_size={batch}", "--devices=1"])
    overridden_out = capsys.readouterr().out
    reference = load_config_file(config_file)  # the override applied by hand, planned directly
    reference.model.path = str(model_dir)
    reference.train.batch_size = batch
    assert overridden_out.strip() == format_plan(plan(reference, "H200", 1)), f"seed {seed}"
    assert overridden_out != default_out, f"seed {seed}"  # the training activations grow with the batch
    with pytest.raises(SystemExit):
        cli.main(common + ["--config.train.bach_size=8"])
    assert "config.train has no key 'bach_size'; did you mean config.train.batch_size?" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checked by the compiler

@pytest.mark.slow  # compiles the 3B rollout and train-step programs
@pytest.mark.parametrize("devices", [1, pytest.param(8, marks=pytest.mark.multidevice)])
def test_planned_memory_of_3b_programs_is_within_15_percent_of_the_compilers(devices):
    """configs/qwen3b.py (the real Qwen2.5-3B shape): the planned per-device peak of the curation rollouts
    (64 prompts x 4 samples, prompt bucket 2048 + 1024 new tokens) and of the training step (batch 4 at
    sequence 4096, remat full) against memory_analysis() of the real jitted programs, lowered with
    abstract sharded inputs and compiled by XLA:CPU (nothing allocated). float32: XLA:CPU upcasts
    bfloat16 matmul operands to float32 copies (hoisted out of the layer loop) that a GPU/TPU compiler
    does not make, so bfloat16 on CPU would measure the CPU, not the program. 1 device: ~30 s of
    compiling; 8 devices (the config's mesh: everything on fsdp, so batch 8; sampling on the mesh
    sampling.mesh.sampling_mesh picks for the plan's accelerator): ~60-100 s on 2 cores."""
    c = load_config_file(str(Path(__file__).resolve().parents[2] / "configs" / "qwen3b.py"))
    c.model.dtype = "float32"
    c.train.batch_size = max(4, devices)  # a batch the data-parallel devices divide (8: one row each)
    results = check_against_compiler(c, devices)
    assert results["backend"] == "cpu"
    report = cli.format_check(results)
    for stage in ("curate rollouts", "training"):
        planned, compiled = results[stage]["planned"], results[stage]["compiled"]["total"]
        assert compiled > 5 * 2**30, report  # the real programs, not a toy
        assert abs(planned - compiled) <= 0.15 * compiled, report
    assert "XLA:CPU" in report


@pytest.mark.parametrize("teacher_mode", ["online", "cached"])
def test_the_compiler_check_lowers_the_train_step_on_the_typed_batch(teacher_mode):
    """The training check lowers distill.step's own program (lower_train_step) on DistillBatch.abstract:
    the batch it takes is the one the step reads in that teacher mode, sized by the planned shape."""
    from ssb_jax.distill.batch import DistillBatch
    from ssb_jax.distill.config import TrainConfig
    from ssb_jax.distill.step import lower_train_step
    shape = analytic.TrainingShape(batch=2, student_len=32, teacher_len=48, answer_len=16)
    tc = TrainConfig(teacher_mode=teacher_mode, topk=8, lora_rank=4, logits_chunk=8)
    batch = DistillBatch.abstract(shape.batch, shape.student_len, shape.teacher_len, shape.answer_len,
                                  teacher_mode=teacher_mode, topk=tc.topk)
    lowered = lower_train_step(TINY, tc, batch, None)
    taken = lowered.args_info[0][2]  # (state, base, batch)
    assert isinstance(taken, DistillBatch)
    assert [(name, getattr(taken, name).shape) for name in DistillBatch.step_fields(teacher_mode)] == \
        [(name, getattr(batch, name).shape) for name in DistillBatch.step_fields(teacher_mode)]
    assert (taken.teacher_tokens is None) == (teacher_mode == "cached")
    assert (taken.teacher_topk_ids is None) == (teacher_mode == "online")


def test_compiled_bytes_reads_memory_analysis_and_counts_donated_buffers_once():
    """A donated argument that comes back as the output is one buffer: argument + output + temp - alias."""
    x = jax.ShapeDtypeStruct((1024, 256), np.float32)
    donated = compiled_bytes(jax.jit(lambda a: a * 2, donate_argnums=0).lower(x).compile())
    kept = compiled_bytes(jax.jit(lambda a: a * 2).lower(x).compile())
    assert donated["argument"] == kept["argument"] == 1024 * 256 * 4
    assert donated["alias"] == 1024 * 256 * 4 and kept["alias"] == 0
    assert donated["total"] == 1024 * 256 * 4 and kept["total"] == 2 * 1024 * 256 * 4


# ----------------------------------------------------------------------------- evaluation

def _tiny_model_dir(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    return directory


def test_eval_plan_uses_the_datasets_prompt_lengths(tmp_path, seed):
    """The eval stage is planned at the sampler's batch, the longest prompt of each dataset (tokenized
    with the chat template, padded to the sampler's prompt bucket), the protocols' largest budget and
    n samples; its time grows with the number of problems."""
    from ssb_jax.model.tokenizer import encode_chat, load_tokenizer
    from ssb_jax.paths import shared_data_path
    from ssb_jax.prompts import DEFAULT_PROMPTS
    rng = random.Random(seed)
    # the first question short and another long, so the first alone pads to a smaller prompt bucket
    words = [5] + [rng.randint(5, 400) for _ in range(rng.randint(1, 7))]
    words.insert(rng.randint(1, len(words)), 400)
    questions = [" ".join(f"word{rng.randrange(1000)}" for _ in range(n)) for n in words]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in questions))
    tokenizer_dir = shared_data_path("qwen2.5_tokenizer")
    c = base_config()
    c.model.path, c.model.tokenizer, c.model.dtype = str(_tiny_model_dir(tmp_path)), str(tokenizer_dir), "float32"
    c.eval.datasets = f"mine={data}"
    c.eval.n_samples = rng.randint(2, 6)  # the n-sample pass (1024 new tokens, as string_match's greedy) is the largest
    c.sampler.batch_size, c.sampler.min_prompt_bucket = 8, 16
    result = plan(c, "H100-80G")
    tokenizer = load_tokenizer(tokenizer_dir)
    longest = max(len(encode_chat(tokenizer, DEFAULT_PROMPTS.student_messages(q))) for q in questions)
    bucket = 1 << (longest - 1).bit_length()  # power-of-two prompt buckets
    programs, count, tokenized = analytic.eval_shapes(c)["mine"]
    assert programs == [SamplingShape(8, bucket, 1024, 1), SamplingShape(8, bucket, 1024, c.eval.n_samples)], \
        f"seed {seed}"  # greedy (both protocols share it) and the n-sample pass
    assert (count, tokenized) == (len(questions), True)
    assert result["assumptions"]["eval_problems"] == {"mine": len(questions)}
    shape = result["shapes"]["eval mine"]
    kv = result["terms_gib"]["eval mine"]["kv_cache"] * 2**30
    assert kv == 2 * 8 * shape.samples * (bucket + 1024) * TINY.num_layers * TINY.kv_size * 4
    assert result["fits"]["eval"] and result["time_estimate_s"]["eval"] > 0
    c.eval.max_problems = 1  # fewer problems: less time, and only the first one's prompt counts
    fewer = plan(c, "H100-80G")
    assert fewer["time_estimate_s"]["eval"] < result["time_estimate_s"]["eval"]
    first = len(encode_chat(tokenizer, DEFAULT_PROMPTS.student_messages(questions[0])))
    assert fewer["shapes"]["eval mine"].prompt_len == max(16, 1 << (first - 1).bit_length()), f"seed {seed}"


def test_plan_command_line_overrides_reach_the_eval_stage(capsys, seed):
    """--config.eval.* overrides change the eval plan exactly as setting them in the config does (the
    real 3B config and the shared AIME 2024 prompts, tokenized with the shared Qwen2.5 tokenizer)."""
    n = random.Random(seed).randint(2, 30)
    config_file = str(Path(__file__).resolve().parents[2] / "configs" / "qwen3b.py")
    common = ["--config", config_file, "--accelerator", "H200", "--config.eval.datasets=aime24"]
    cli.main(common + [f"--config.eval.n_samples={n}", "--config.eval.protocols=math_verify"])
    out = capsys.readouterr().out
    reference = load_config_file(config_file)
    reference.eval.datasets, reference.eval.n_samples, reference.eval.protocols = "aime24", n, "math_verify"
    assert out.strip() == format_plan(plan(reference, "H200")), f"seed {seed}"
    # the n-sample pass is the largest program: 64 prompts x n samples of the longest prompt's bucket
    assert "eval aime24 (prompts=64, prompt_len=512, new_tokens=1024, samples=" + f"{n})" in out, f"seed {seed}"
    assert "'eval_prompt_length': {'aime24': 'longest tokenized prompt'}" in out
    with pytest.raises(SystemExit):
        cli.main(common + ["--config.eval.n_sample=8"])
    assert "did you mean config.eval.n_samples?" in capsys.readouterr().err


def test_plan_command_line_checks_against_the_compiler(tmp_path, capsys):
    """--check-compiled prints the compiled programs' memory_analysis() beside the plan (tiny model, one
    device), naming the compiler whose buffer assignment it is."""
    config_file = str(Path(__file__).resolve().parents[2] / "configs" / "qwen3b.py")
    cli.main(["--config", config_file, f"--config.model.path={_tiny_model_dir(tmp_path)}",
                      "--config.model.dtype=float32", "--config.sampler.max_prompt_tokens=64",
                      "--config.curate.rollout_max_new_tokens=16", "--config.curate.solution_max_new_tokens=16",
                      "--accelerator=H100-80G", "--check-compiled"])
    out = capsys.readouterr().out
    assert "XLA:CPU's buffer assignment" in out
    for stage in ("curate rollouts", "training"):
        line = next(line for line in out.splitlines() if line.strip().startswith(stage + " ") and "compiled" in line)
        compiled = line.split("compiled")[1].split()
        assert float(compiled[0]) > 0 and compiled[1] in ("KiB", "MiB"), line
        assert abs(float(line.split("(")[1].split("%")[0])) < 100, line  # planned vs compiled, in percent


@pytest.mark.multidevice
def test_sampling_memory_is_planned_on_the_sampling_mesh(tmp_path, monkeypatch):
    """The planner picks the sampling mesh sampling.mesh.sampling_mesh picks, and its sampling figures are
    the per-device sizes of real arrays placed there: replicated weights when they fit one device,
    split over the tensor axis when the device is too small."""
    from ssb_jax.sampling.mesh import SAMPLING_WEIGHT_SHARE, sampling_mesh
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    c = base_config()
    c.model.path, c.model.dtype = str(directory), "float32"
    c.sampler.batch_size, c.sampler.max_prompt_tokens = 6, 16  # on 4 data-parallel devices padded to 8 rows
    c.curate.num_rollouts, c.curate.rollout_max_new_tokens, c.curate.solution_max_new_tokens = 2, 8, 8
    params = nnx.state(init_model(TINY, 0))
    tensor_two = state_bytes_per_device(nnx.state(abstract_model(TINY)), {"data": 2, "fsdp": 1, "tensor": 2})
    for memory, expected in ((2**30, {"data": 4, "fsdp": 1, "tensor": 1}),
                             (tensor_two / SAMPLING_WEIGHT_SHARE, {"data": 2, "fsdp": 1, "tensor": 2})):
        monkeypatch.setitem(ACCELERATORS, "tiny-4", Accelerator(4, memory / 2**30, 1.0, 1.0))
        result = plan(c, "tiny-4")
        m = result["memory_gib_per_device"]
        assert result["sampling_mesh"] == expected
        mesh = sampling_mesh(TINY, jax.devices()[:4], memory_per_device=memory)
        assert dict(mesh.shape) == expected
        assert m["sampling_weights"] * 2**30 == device0_bytes(shard_state(params, mesh))
        rows = -(-6 // expected["data"]) * expected["data"]  # the Sampler's filler rows included
        shape = cache_shape(TINY, rows * 2, 16 + 8)
        k = jax.device_put(np.zeros(shape, np.float32), named_sharding(CACHE_AXES["k"], shape, mesh))
        assert m["sampling_kv_cache"] * 2**30 == 2 * device0_bytes(k)
        # the run keeps its sampling copy while it trains (the training mesh puts every device on fsdp)
        assert m["sampling_copy_while_training"] == m["sampling_weights"]
    assert result["memory_gib_per_device"]["sampling_weights"] * 2**30 < TINY.param_count() * 4


def test_plan_refuses_a_train_batch_the_mesh_does_not_divide(tmp_path, capsys):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    c = base_config()
    c.model.path = str(directory)
    c.train.batch_size = 6
    assert plan(c, "v4-8")["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}  # the automatic mesh fits the batch
    c.mesh.data, c.mesh.tensor = 1, 1  # tensor fixed: the 4 devices are data parallel whatever the batch
    with pytest.raises(ValueError, match=r"config.train.batch_size=6 is not a multiple of the data-parallel size 4"):
        plan(c, "v4-8")
    config_file = str(Path(__file__).resolve().parents[2] / "configs" / "qwen3b.py")
    with pytest.raises(SystemExit):
        cli.main(["--config", config_file, f"--config.model.path={directory}", "--accelerator", "v5e-8",
                  "--config.mesh.tensor=1"])
    assert "config.train.batch_size=4 is not a multiple of the data-parallel size 8" in capsys.readouterr().err


@pytest.mark.parametrize("impl", ["xla", "chunked", "splash"])
def test_attention_terms_follow_the_kernel_the_config_resolves_to(impl, seed):
    """Dense XLA attention costs float32 [rows, heads, T, T] scores; the chunked kernel one
    [rows, heads, block, block] tile plus the log-sum-exp; a fused kernel only the log-sum-exp in HBM.
    The training terms (one layer's backward, the teacher forward, what remat none keeps) follow."""
    from ssb_jax.config import section_to
    from ssb_jax.distill.config import TrainConfig
    from ssb_jax.model.attention import chunk_layout
    rng = random.Random(seed)
    config = TINY.replace(attention_impl=impl, remat=rng.choice(["full", "none"]))
    rows, T, tensor = rng.randint(1, 4), rng.choice([640, 1024, 1536]), rng.choice([1, 2])
    heads = config.num_heads // tensor
    block = chunk_layout(T)[1]
    score = {"xla": rows * heads * T * T * 4, "chunked": rows * heads * block * block * 4, "splash": 0}[impl]
    lse = 0 if impl == "xla" else rows * heads * T * 4
    assert analytic.attention_kernel(config, T, "cpu" if impl != "splash" else "tpu") == impl
    assert analytic.attention_working_set(config, rows, T, T, tensor, impl) == 2 * score + lse, f"seed {seed}"
    assert analytic.attention_working_set(config, rows, T, T, tensor, impl, backward=True) == 4 * score + lse
    saved = analytic.attention_saved_bytes(config, rows, T, tensor, impl)
    if impl == "xla":
        assert saved == (2 if config.remat == "none" else 1) * score, f"seed {seed}"
    else:  # the custom VJP keeps its output and the log-sum-exp, never a score array
        assert saved == rows * T * config.q_size // tensor * 4 + lse, f"seed {seed}"
    axes = {"data": 1, "fsdp": 1, "tensor": tensor}
    lora_config = section_to(TrainConfig, base_config().train, "config.train").lora_config()
    terms = analytic.training_memory(config, axes, analytic.TrainingShape(rows, T, T, 16), lora_config,
                                        weights=0, lora=0, optimizer=0, chunk=8,
                                        backend="cpu" if impl != "splash" else "tpu")
    assert terms["layer_backward_attention"] == 4 * score + lse, f"seed {seed}"
    assert terms["teacher_forward_attention"] == 2 * score + lse, f"seed {seed}"


# ----------------------------------------------------------------------------- GRPO and the on-policy stages

METHOD_STAGES = ("grpo", "onpolicy", "opsd", "sdpo")


def _method_config(tmp_path, stages: str):
    """A tiny model (the default remat, none) with GRPO's and the on-policy stages' batches of 8 rows (one
    per device of an 8-device fsdp mesh) at 64 prompt + 32 new tokens. The planned update peaks are 4-6%
    under XLA:CPU's here on 1 device, 12-13% on 8 (the layers' weights gathered over fsdp); at the 3B shapes
    of configs/qwen3b_{grpo,opsd,sdpo}.py on 1 device 3-11%, measured by --check-compiled."""
    model = TINY.replace(hidden_size=128, intermediate_size=256, head_dim=32, vocab_size=512)
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.to_hf_dict()))
    c = base_config()
    c.model.path, c.model.dtype, c.stages = str(directory), "float32", stages
    c.sampler.max_prompt_tokens, c.curate.solution_max_new_tokens = 64, 32  # SSB's pairs (lambda < 1) as short
    c.grpo.prompts_per_step, c.grpo.group_size, c.grpo.max_new_tokens, c.grpo.logits_chunk = 2, 4, 32, 16
    for name in ("onpolicy", "opsd", "sdpo"):
        c[name].max_new_tokens, c[name].logits_chunk = 32, 16
        c[name].prompts_per_step = 2 if c[name].samples_per_prompt == 4 else 8  # sdpo: 4 samples per question
    return c


def test_plan_sizes_grpo_and_onpolicy_stages_only_when_selected(tmp_path, capsys):
    """config.stages decides which of GRPO and the on-policy stages are planned: their sampling (rows =
    prompts x samples at max_new_tokens) and update (the rows of one optimiser step at the trainer's padded
    lengths), a fit verdict and a time each; an unselected one is nowhere in the plan or its text."""
    from ssb_jax.distill.batch import quarter_power_of_two
    c = _method_config(tmp_path, "curate,train,eval")
    none = plan(c, "H100-80G", include_eval=False)
    text = format_plan(none)
    assert none["methods"] == {}
    assert not any(name in key for name in METHOD_STAGES for key in [*none["terms_gib"], *none["time_estimate_s"]])
    assert not any(name in line.split()[0] for line in text.splitlines()[2:] if line.strip() for name in METHOD_STAGES)
    for chosen in ("grpo", "opsd", "sdpo,onpolicy"):
        c.stages = chosen + ",eval"
        result = plan(c, "v5e-8", include_eval=False)
        text = format_plan(result)
        assert set(result["methods"]) == set(chosen.split(","))
        for name in METHOD_STAGES:
            planned = name in chosen.split(",")
            assert (f"{name} update total" in text) == planned and (f"{name} sampling (" in text) == planned, text
            assert (name in result["time_estimate_s"]) == planned
            if planned:
                assert result["fits"][f"{name} update"] and result["time_estimate_s"][name] > 0
    grpo = plan(_method_config(tmp_path, "grpo"), "v5e-8", include_eval=False)
    shape = grpo["shapes"]
    data_parallel = grpo["sampling_mesh"]["data"] * grpo["sampling_mesh"]["fsdp"]
    # one call: the questions (padded to the sampling mesh's data-parallel size), group_size samples each
    assert shape["grpo sampling"] == SamplingShape(-(-2 // data_parallel) * data_parallel, 64, 32, 4)
    # one optimiser step: prompts x group / minibatches rows, padded to the 8 data-parallel devices
    assert shape["grpo update"] == analytic.TrainingShape(8, quarter_power_of_two(64 + 32), 0, 32)
    sdpo = plan(_method_config(tmp_path, "sdpo"), "v5e-8", include_eval=False)
    # a peer's sample in the teacher's prompt; the EMA teacher's adapters in the state
    assert sdpo["shapes"]["sdpo update"].teacher_len > sdpo["shapes"]["sdpo update"].student_len
    assert sdpo["terms_gib"]["sdpo update"]["ema_teacher_lora"] == sdpo["terms_gib"]["sdpo update"]["lora"] > 0
    # lambda < 1: SSB's batch in the same step keeps its residuals for the one backward pass too
    c = _method_config(tmp_path, "onpolicy")
    alone = plan(c, "v5e-8", include_eval=False)
    c.onpolicy.onpolicy_weight = 0.5
    mixed = plan(c, "v5e-8", include_eval=False)
    assert mixed["methods"]["onpolicy"].offline == mixed["shapes"]["training"]
    terms = mixed["terms_gib"]["onpolicy update"]
    assert terms["total"] >= alone["terms_gib"]["onpolicy update"]["total"] + terms["offline_saved_for_backward"] > \
        alone["terms_gib"]["onpolicy update"]["total"]
    assert mixed["time_estimate_s"]["onpolicy"] > alone["time_estimate_s"]["onpolicy"]


def test_an_onpolicy_step_in_microbatches_is_planned_one_microbatch_at_a_time(tmp_path):
    """microbatches = 4: the update's activations are one quarter of the rows' (the plan's update shape has a
    quarter of the rows, so less is saved for the backward pass), and the step's time is the same work."""
    c = _method_config(tmp_path, "sdpo")
    whole = plan(c, "H100-80G", include_eval=False)
    c.sdpo.microbatches = 4
    split = plan(c, "H100-80G", include_eval=False)
    assert split["methods"]["sdpo"].microbatches == 4
    assert split["shapes"]["sdpo update"].batch * 4 == whole["shapes"]["sdpo update"].batch == 8
    assert split["terms_gib"]["sdpo update"]["saved_for_backward"] == pytest.approx(
        whole["terms_gib"]["sdpo update"]["saved_for_backward"] / 4)
    assert split["terms_gib"]["sdpo update"]["total"] < whole["terms_gib"]["sdpo update"]["total"]
    assert split["time_estimate_s"]["sdpo"] == pytest.approx(whole["time_estimate_s"]["sdpo"])


@pytest.mark.slow  # compiles one update program (~10 s on 2 cores)
def test_planned_update_in_microbatches_is_within_15_percent_of_the_compilers(tmp_path):
    """The real update program with microbatches = 2 (a scan over two slices of the rows), compiled for its
    whole batch: its peak within the planner's tolerance of the plan for one microbatch's activations."""
    c = _method_config(tmp_path, "sdpo")
    c.sdpo.microbatches = 2
    results = check_against_compiler(c, 1)
    planned, compiled = results["sdpo update"]["planned"], results["sdpo update"]["compiled"]["total"]
    assert abs(planned - compiled) <= 0.15 * compiled, cli.format_check(results)


@pytest.mark.slow  # compiles the four update programs (~5-15 s each on 2 cores), the rollouts and SSB's step
@pytest.mark.parametrize("devices", [1, pytest.param(8, marks=pytest.mark.multidevice)])
def test_planned_update_memory_of_grpo_and_onpolicy_steps_is_within_15_percent_of_the_compilers(tmp_path, devices):
    """--check-compiled's figures (check_against_compiler): the planned per-device peak of each selected
    stage's update step against memory_analysis() of the real jitted program (grpo.step.lower_update,
    onpolicy.step.lower_update: abstract sharded state, base and batch, compiled by XLA:CPU, nothing
    allocated), within the 3B check's tolerance; and the state the program takes (frozen base, the stage's
    own LoRA and Adam moments, the EMA teacher's adapters) plus its batch is the compiled arguments. On one
    device `onpolicy` mixes in SSB's offline loss (lambda 0.5: SSB's batch in the same step)."""
    from ssb_jax.distill.batch import DistillBatch
    from ssb_jax.grpo.batch import RolloutBatch
    c = _method_config(tmp_path, ",".join(METHOD_STAGES))
    if devices == 1:
        c.onpolicy.onpolicy_weight = 0.5
    results = check_against_compiler(c, devices)
    report = cli.format_check(results)
    p = plan(c, "H100-80G" if devices == 1 else "v5e-8", devices, include_eval=False, backend="cpu")
    assert set(results) == {"backend", "curate rollouts", "training"} | {f"{name} update" for name in METHOD_STAGES}
    for name, method in p["methods"].items():
        compiled = results[f"{name} update"]["compiled"]
        terms = {k: v * 2**30 for k, v in p["terms_gib"][f"{name} update"].items()}
        assert results[f"{name} update"]["planned"] == pytest.approx(terms["total"])
        assert abs(terms["total"] - compiled["total"]) <= 0.15 * compiled["total"], report
        shape = method.update
        batch = (RolloutBatch.abstract(shape.batch, shape.student_len, shape.answer_len) if name == "grpo" else
                 DistillBatch.abstract(shape.batch, shape.student_len, shape.teacher_len, shape.answer_len))
        if method.offline is not None:
            ssb = method.offline
            batch = (batch, DistillBatch.abstract(ssb.batch, ssb.student_len, ssb.teacher_len, ssb.answer_len))
        batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) // devices  # rows split
        state = terms["weights"] + terms["lora"] + terms["ema_teacher_lora"] + terms["optimizer_state"]
        assert abs(compiled["argument"] - batch_bytes - state) <= 2**12, report  # scalars: Adam's count, the step
        assert f"  {name} update " in report
